"""Hamilton dataflow: inference tiles → square windows → rows of the LanceDB ``tile_embeddings`` table.

Two entry outputs:
- ``tile_window_chips``: one tile (``tile_chip``, the :class:`~aegir.utils.types.Chip` region inference reads, with
  ``tile_path``) cut into ``window_px``² windows every ``stride_px`` pixels (the last row / column of windows is
  flush with the tile's edge, so every pixel is covered; tiles smaller than a window give one padded window).
  Each window Chip carries ``extras``: ``uuid`` (uuid5 of tile path + offsets + size: stable, model-independent),
  ``tile_path``, ``window_col``, ``window_row``, ``window_px``.
- ``tile_embedding_rows``: a batch of such windows (``window_chips``) encoded with ``encode_chips``
  (``(B, C, H, W)`` uint8 RGB → ``(B, D)``, the same :class:`~aegir.training.embedder.ChipEncoder` as the training
  chips), L2-normalised, with footprint (WKB polygon, EPSG:4326), centroid, the S2 cell token at ``plan_level``
  (the grid-plan cell holding the window's centre) and the S2 tokens l13 / l17; ``embedding_context`` gives
  ``model``, ``model_checkpoint``, ``model_data_version``, ``region``, ``tiles_dir``, ``embedded_at``.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

from aegir.dataflows.chip_embeddings import chip_embedding_vectors
from aegir.store.embedding_store import tile_embeddings_schema
from aegir.utils import geo, s2geometry
from aegir.utils.types import Chip

WINDOW_NAMESPACE = uuidlib.UUID("0f3c1d52-8e4b-4f0e-9c0a-6d1f2b7e9a31")
EncodeChips = Callable  # (B, C, H, W) -> (B, D); bare: Hamilton checks the type with isinstance


def _offsets(length: int, window_px: int, stride_px: int) -> list[int]:
    """Window starts along one axis: every ``stride_px``, the last one flush with the edge (0 if too short)."""
    if length <= window_px:
        return [0]
    starts = list(range(0, length - window_px + 1, stride_px))
    return starts if starts[-1] == length - window_px else starts + [length - window_px]


def _window_uuid(tile_path: str, col: int, row: int, window_px: int) -> str:
    """uuid5 of ``<tile path>:<col>:<row>:<px>``: the window's key, the same for every model."""
    return str(uuidlib.uuid5(WINDOW_NAMESPACE, f"{tile_path}:{col}:{row}:{window_px}"))


def tile_window_chips(tile_chip: Chip, tile_path: str, window_px: int = 256, stride_px: int = 256) -> list[Chip]:
    """The tile's ``window_px``² windows (row-major), each a Chip on the tile's CRS with its own transform."""
    if window_px < 16 or stride_px < 1:
        raise ValueError(f"window_px must be ≥ 16 and stride_px ≥ 1, got {window_px} and {stride_px}")
    chips = []
    for row in _offsets(tile_chip.height, window_px, stride_px):
        for col in _offsets(tile_chip.width, window_px, stride_px):
            chip = geo.chip_window(tile_chip, col, row, window_px)
            chip.extras.update(uuid=_window_uuid(tile_path, col, row, window_px), tile_path=tile_path,
                               window_col=col, window_row=row, window_px=window_px)
            chips.append(chip)
    return chips


def window_images(window_chips: list[Chip]) -> list[np.ndarray]:
    """(3, H, W) uint8 RGB of every window (what the encoder was trained on)."""
    return [chip.rgb8() for chip in window_chips]


def window_footprints(window_chips: list[Chip]) -> list[shapely.Geometry]:
    """Each window's footprint polygon in EPSG:4326."""
    return [geo.footprint_lonlat(c.crs, geo.grid_bounds(c.transform, c.width, c.height)) for c in window_chips]


def window_centroids(window_footprints: list[shapely.Geometry]) -> np.ndarray:
    """(N, 2) lon, lat (degrees) of the footprint centroids."""
    points = shapely.centroid(np.asarray(window_footprints, dtype=object)) if window_footprints else []
    return np.column_stack([shapely.get_x(points), shapely.get_y(points)]).reshape(-1, 2)


def window_cell_tokens(window_centroids: np.ndarray, plan_level: int) -> np.ndarray:
    """S2 token at ``plan_level`` (the grid-plan level) of each window centre, (N,) str."""
    return s2geometry.s2_tokens(window_centroids[:, 1], window_centroids[:, 0], plan_level)


def window_vectors(window_images: list[np.ndarray], encode_chips: EncodeChips) -> np.ndarray:
    """(N, D) unit-length float32 embeddings of the windows."""
    return chip_embedding_vectors(window_images, encode_chips)


def tile_embedding_rows(window_chips: list[Chip], window_vectors: np.ndarray, window_footprints: list,
                        window_centroids: np.ndarray, window_cell_tokens: np.ndarray, plan_level: int,
                        embedding_context: dict[str, Any]) -> pa.Table:
    """One ``tile_embeddings`` row per window (schema :func:`~aegir.store.embedding_store.tile_embeddings_schema`)."""
    n, dim = window_vectors.shape
    lon, lat = window_centroids[:, 0], window_centroids[:, 1]
    extras = [c.extras for c in window_chips]
    columns: dict[str, Any] = {
        "uuid": [e["uuid"] for e in extras],
        "model": [embedding_context["model"]] * n,
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(window_vectors.reshape(-1), pa.float32()), dim),
        **{key: [embedding_context[key]] * n for key in
           ("model_checkpoint", "model_data_version", "embedded_at", "region", "tiles_dir")},
        **{key: [e[key] for e in extras] for key in ("tile_path", "window_col", "window_row", "window_px")},
        "footprint_wkb": shapely.to_wkb(np.asarray(window_footprints, dtype=object)).tolist() if n else [],
        "centroid_lon": lon, "centroid_lat": lat,
        "plan_level": [plan_level] * n,
        "cell_token": [str(t) for t in window_cell_tokens],
        "s2_token_l13": s2geometry.s2_tokens(lat, lon, 13).tolist() if n else [],
        "s2_token_l17": s2geometry.s2_tokens(lat, lon, 17).tolist() if n else [],
    }
    return pa.table(columns, schema=tile_embeddings_schema(dim))

"""Jobs for tile-window embeddings and the flywheel's two embedding hooks (hard-negative mining, find more like
this); called by ``aegir infer embed-tiles``, ``aegir search tiles`` and :mod:`aegir.pipelines.flywheel_steps`.

Tiles are indexed and read through :mod:`aegir.store.region_files`, cut and encoded by
:mod:`aegir.dataflows.tile_embeddings`, written and searched through :mod:`aegir.store.embedding_store`; the hooks'
logic is :mod:`aegir.dataflows.embedding_hooks` (the store's vector search is passed in as a function).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import shapely

from aegir.config import Settings
from aegir.store import embedding_store, region_files

EMBED_BATCH = 32


@dataclass
class TileEmbedReport:
    """Outcome of one :func:`embed_region_tiles` run (``windows`` = embedded + skipped_existing)."""

    table: str
    model: str
    dim: int
    region: str
    tiles: int
    windows: int
    embedded: int
    skipped_existing: int
    version: int
    cells: int
    tiles_skipped: list[dict] = field(default_factory=list)
    index: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def tile_table(settings: Settings, dim: int | None = None,
               name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE):
    """The ``tile_embeddings`` table under the LanceDB root (created for ``dim``-vectors when missing)."""
    Path(settings.lancedb_root).mkdir(parents=True, exist_ok=True)
    return embedding_store.open_tile_embeddings_table(settings.lancedb_root, name, dim)


def _index_tiles(tiles_dir: str | Path) -> tuple[list[region_files.TileRef], list[dict]]:
    tiles, skipped = region_files.tile_index(tiles_dir)
    if not tiles:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"{tiles_dir}: no tile can be placed on the map ({reasons or 'no image files'})")
    return tiles, skipped


def _read_tile(tile: region_files.TileRef):
    return region_files.read_tile_window(tile, tile.bounds, tile.crs)


def embed_region_tiles(settings: Settings, encoder: Any, tiles_dir: str | Path, plan_level: int = 14,
                       window_px: int = 256, stride_px: int | None = None, batch_size: int = EMBED_BATCH,
                       table_name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE, build_index: bool = True,
                       progress: Callable[[int, int], None] | None = None) -> TileEmbedReport:
    """Embed every ``window_px``² window (stride ``stride_px``, default ``window_px``) of the tiles region inference
    reads from ``tiles_dir`` with ``encoder`` (a :class:`~aegir.training.embedder.ChipEncoder`), ``batch_size``
    windows per encoder call and per commit. Idempotent: windows already embedded by this model are skipped
    before their pixels are encoded. ``progress(tiles done, tiles)`` per tile."""
    import time

    from aegir.pipelines import build_driver
    from aegir.dataflows import tile_embeddings

    started = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    tiles, skipped = _index_tiles(tiles_dir)
    table = tile_table(settings, encoder.dim, table_name)
    region = embedding_store.region_key(tiles_dir)
    done = {u for u in embedding_store.tile_windows(table, encoder.model_id, region, ["uuid"])["uuid"].to_pylist()}
    context = {"model": encoder.model_id, "model_checkpoint": encoder.checkpoint,
               "model_data_version": encoder.data_version, "region": region,
               "tiles_dir": str(Path(tiles_dir).absolute()), "embedded_at": dt.datetime.now(dt.timezone.utc)}
    dag = build_driver([tile_embeddings])
    counts = {"windows": 0, "embedded": 0}
    pending: list = []

    def flush() -> None:
        if pending:
            rows = dag.execute(["tile_embedding_rows"], inputs={
                "window_chips": list(pending), "encode_chips": encoder.encode, "plan_level": plan_level,
                "embedding_context": context})["tile_embedding_rows"]
            embedding_store.upsert_embeddings(table, rows)
            counts["embedded"] += len(pending)
            pending.clear()

    for number, tile in enumerate(tiles, start=1):
        windows = dag.execute(["tile_window_chips"], inputs={
            "tile_chip": _read_tile(tile), "tile_path": str(Path(tile.path).absolute()), "window_px": window_px,
            "stride_px": stride_px or window_px})["tile_window_chips"]
        counts["windows"] += len(windows)
        for chip in windows:
            if chip.extras["uuid"] not in done:
                pending.append(chip)
                if len(pending) >= batch_size:
                    flush()
        if progress:
            progress(number, len(tiles))
    flush()
    cells = len(set(embedding_store.tile_windows(table, encoder.model_id, region, ["cell_token"])["cell_token"]
                    .to_pylist()))
    index = (embedding_store.ensure_indexes(table, scalar_columns=embedding_store.TILE_SCALAR_INDEX_COLUMNS)
             if build_index else {})
    return TileEmbedReport(f"{settings.lancedb_root}/{table_name}", encoder.model_id, encoder.dim, region, len(tiles),
                           counts["windows"], counts["embedded"], counts["windows"] - counts["embedded"],
                           int(table.version), cells, skipped, index, round(time.perf_counter() - started, 2))


def region_label_geometries(settings: Settings, bounds: tuple[float, float, float, float]) -> list:
    """Known PV label geometries (EPSG:4326) of the lakehouse intersecting ``bounds`` (empty without labels)."""
    from aegir.store import ducklake

    con = ducklake.connect(settings)
    try:
        if not ducklake.label_tables(con, settings):
            return []
        labels = ducklake.query_labels(con, settings, ducklake.LabelQuery(bbox=tuple(bounds)))
    finally:
        con.close()
    return list(shapely.from_wkt(labels["geometry_wkt"].to_pylist())) if labels.num_rows else []


def _searcher(table, model: str, region: str) -> Callable:
    def nearest_windows(vector, k: int, exclude_uuids: list[str]) -> list[dict]:
        return embedding_store.search_tile_windows(table, vector, k, model, region, exclude_uuids)

    return nearest_windows


def _hook_inputs(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                 tiles_dir: str | Path, crop_px: int, round_index: int) -> dict[str, Any]:
    """The inputs both hooks share: queries, encoder, the region's windows, labels and the store's search."""
    table = tile_table(settings)
    region = embedding_store.region_key(tiles_dir)
    windows = embedding_store.tile_windows(table, encoder.model_id, region)
    if windows.num_rows == 0:
        raise ValueError(f"no tile windows of {tiles_dir} embedded by model {encoder.model_id}: "
                         "run embed_region_tiles (`aegir infer embed-tiles`) with the same checkpoint first")
    bounds = shapely.union_all(shapely.from_wkb(windows["footprint_wkb"].to_pylist())).bounds
    return {"detections": detections, "validation_decisions": decisions, "detection_tiles": detection_tiles,
            "crop_px": crop_px, "encode_chips": encoder.encode, "region_windows": windows,
            "label_geometries": region_label_geometries(settings, bounds),
            "nearest_windows": _searcher(table, encoder.model_id, region), "round_index": round_index}


def mine_hard_negatives(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                        tiles_dir: str | Path, crop_px: int = 256, mine_k: int = 5, max_mined: int = 32,
                        max_queries: int = 64, round_index: int = 0) -> pa.Table:
    """Hook (a): tile windows nearest to the rejected detections, proposed as negatives (schema
    :data:`aegir.dataflows.embedding_hooks.HIT_SCHEMA`; none overlaps a detection or a known label)."""
    from aegir import pipelines

    inputs = _hook_inputs(settings, encoder, detections, decisions, detection_tiles, tiles_dir, crop_px, round_index)
    inputs |= {"max_hard_negatives": max_queries, "mine_k": mine_k, "max_mined": max_mined}
    return pipelines.run_stage("embedding_hooks", ["mined_negative_proposals"], inputs)["mined_negative_proposals"]


def find_similar_tiles(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                       tiles_dir: str | Path, crop_px: int = 256, similar_k: int = 5, max_queries: int = 64,
                       round_index: int = 0) -> tuple[pa.Table, dict[str, float]]:
    """Hook (b): the unlabelled windows nearest to the accepted detections and the boost of each grid-plan cell
    holding them (token → Σ (1 − d/2))."""
    from aegir import pipelines

    inputs = _hook_inputs(settings, encoder, detections, decisions, detection_tiles, tiles_dir, crop_px, round_index)
    inputs |= {"max_backfill": max_queries, "similar_k": similar_k}
    out = pipelines.run_stage("embedding_hooks", ["similar_tile_hits", "cell_boosts"], inputs)
    return out["similar_tile_hits"], out["cell_boosts"]


def window_chips(hits: pa.Table, tiles_dir: str | Path) -> list:
    """The tile windows of ``hits`` (``tile_path``, ``window_col/row/px``, ``footprint_wkb``) cut from the tiles of
    ``tiles_dir``, as Chips whose ``extras`` hold ``sample_id`` (the window uuid), ``source_detection``,
    ``prompt_wkb`` (the footprint) and ``provenance`` (distance, window, rank, round): ready for ``training_data``."""
    from aegir.utils import geo

    tiles = {str(Path(t.path).absolute()): t for t in _index_tiles(tiles_dir)[0]} if hits.num_rows else {}
    loaded: dict[str, Any] = {}
    out = []
    for row in hits.to_pylist():
        tile = tiles.get(row["tile_path"])
        if tile is None:
            raise FileNotFoundError(f"{row['tile_path']}: the tile of window {row['window_uuid']} is not in "
                                    f"{tiles_dir}")
        if row["tile_path"] not in loaded:
            loaded[row["tile_path"]] = _read_tile(tile)
        chip = geo.chip_window(loaded[row["tile_path"]], row["window_col"], row["window_row"], row["window_px"])
        chip.extras.update(sample_id=row["window_uuid"], source_detection=row["source_detection"],
                           prompt_wkb=row["footprint_wkb"],
                           provenance={"distance": row["distance"], "window_uuid": row["window_uuid"],
                                       "neighbour_rank": row["neighbour_rank"], "mined_round": row["round"]})
        out.append(chip)
    return out


def similar_tiles(settings: Settings, checkpoint: str | Path, tiles_dir: str | Path, image: str | Path, k: int = 10,
                  device: str | None = None,
                  table_name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE) -> dict[str, Any]:
    """The ``k`` windows of the region ``tiles_dir`` nearest to an image file, both embedded with ``checkpoint``.

    Returns ``{"model", "region", "query", "neighbours": [{uuid, distance, tile_path, window_col, window_row,
    window_px, cell_token, centroid_lon, centroid_lat}]}`` (exact search, nearest first).
    """
    from aegir.dataflows.chip_embeddings import normalised_vectors
    from aegir.pipelines.vector_search import load_encoder
    from aegir.store.mask_files import read_image_chip

    if not Path(image).is_file():
        raise FileNotFoundError(f"{image}: no such image file")
    encoder = load_encoder(checkpoint=checkpoint, device=device)
    table = tile_table(settings, name=table_name)
    region = embedding_store.region_key(tiles_dir)
    vector = normalised_vectors(encoder.encode(read_image_chip(image).rgb8()[None]))[0]
    hits = embedding_store.search_tile_windows(table, vector, k, encoder.model_id, region)
    if not hits and embedding_store.tile_windows(table, encoder.model_id, region, ["uuid"]).num_rows == 0:
        raise ValueError(f"no windows of {tiles_dir} embedded by {encoder.model_id}: run `aegir infer embed-tiles` "
                         "with this checkpoint first")
    keep = ("uuid", "distance", "tile_path", "window_col", "window_row", "window_px", "cell_token", "centroid_lon",
            "centroid_lat")
    return {"model": encoder.model_id, "region": region, "query": str(image),
            "neighbours": [{key: hit[key] for key in keep} for hit in hits]}

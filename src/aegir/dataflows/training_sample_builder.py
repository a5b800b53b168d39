"""Hamilton dataflow: chips + masks (+ MSI) → rows of the LanceDB ``training_data`` table.

Inputs: ``sample_chips`` (list of :class:`~aegir.utils.types.Chip`, one per sample, each with ``extras["sample_id"]``
and ``extras["prompt_wkb"]`` — the prompt geometry, WKB, EPSG:4326; optional ``extras["provenance"]``, a dict of
per-sample provenance merged into ``params_json``; optional ``extras["lineage"]``, a dict of
``LINEAGE_TYPE`` fields), ``sample_masks`` (sample_id → (H, W) uint8 generated mask, 0/1, on the chip grid; missing
= no mask yet), ``ignore_masks`` (sample_id → (H, W) bool: pixels of the generated mask with no opinion, stored
as ``MASK_IGNORE``; raw encoding only), ``truth_masks`` (sample_id → (H, W) pixel ground truth, stored in ``truth_mask``), ``msi_chips`` (sample_id → co-registered Sentinel-2 Chip),
``dataset_name``, ``chip_encoding`` ("raw" | "png" | "tiff"), ``mask_source``, ``provenance_params``,
``s2_levels`` and ``h3_resolution`` (``Settings.s2_levels`` / ``Settings.h3_resolution``; default 10, 13, 17 and 12).
Output ``training_rows``: an Arrow table in ``training_data_schema(s2_levels, h3_resolution)`` (the defaults give
``TRAINING_DATA_SCHEMA``); ``sample_uuids`` are the lakehouse prompt uuid (``extras["uuid"]``) or uuid5 of
``dataset:sample_id``, so a rebuild upserts the same rows.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import shapely

from aegir import __version__
from aegir.store.chip_codec import encode_chip
from aegir.config import DEFAULT_H3_RESOLUTION, DEFAULT_S2_LEVELS
from aegir.store.lance_io import LINEAGE_TYPE, MASK_IGNORE, training_data_schema
from aegir.utils import s2geometry
from aegir.utils.types import Chip

SAMPLE_NAMESPACE = uuid.UUID("5b0c7d3e-2f0a-4c61-9a53-0d8e3f1b7a42")


def sample_uuids(sample_chips: list[Chip], dataset_name: str) -> list[str]:
    """The chip's ``extras["uuid"]`` (a lakehouse prompt's uuid) or uuid5 of ``<dataset>:<sample_id>``: stable."""
    return [
        c.extras.get("uuid") or str(uuid.uuid5(SAMPLE_NAMESPACE, f"{dataset_name}:{c.extras['sample_id']}"))
        for c in sample_chips
    ]


def sample_centroids(sample_chips: list[Chip]) -> np.ndarray:
    """(N, 2) lon, lat in degrees (EPSG:4326) of each sample's prompt geometry centroid."""
    prompts = shapely.from_wkb([c.extras["prompt_wkb"] for c in sample_chips])
    centroids = shapely.centroid(prompts)
    return np.stack([shapely.get_x(centroids), shapely.get_y(centroids)], axis=1).reshape(-1, 2)


def sample_s2_tokens(sample_centroids: np.ndarray, s2_levels: Sequence[int] = DEFAULT_S2_LEVELS
                     ) -> dict[int, np.ndarray]:
    """S2 tokens (object arrays of str, shape (N,)) of every sample centroid, keyed by level (``s2_levels``).

    ``Sequence[int]``, not ``tuple[int, ...]``: Hamilton's input check rejects the latter."""
    lon, lat = sample_centroids[:, 0], sample_centroids[:, 1]
    return {int(level): s2geometry.s2_tokens(lat, lon, level) for level in s2_levels}


def sample_h3_cells(sample_centroids: np.ndarray, h3_resolution: int = DEFAULT_H3_RESOLUTION) -> np.ndarray:
    """H3 cell (resolution ``h3_resolution``, 0..15) of every sample centroid, object array of str (N,)."""
    return s2geometry.h3_cells(sample_centroids[:, 1], sample_centroids[:, 0], h3_resolution)


def _timestamp(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def _encode_mask(mask: np.ndarray | None, encoding: str, ignore: np.ndarray | None = None) -> bytes | None:
    if mask is None:
        return None
    binary = (mask > 0).astype(np.uint8)
    if ignore is not None and ignore.any():
        if encoding != "raw":
            raise ValueError(f"masks with ignored pixels need the raw encoding, not {encoding!r}")
        binary[ignore] = MASK_IGNORE
    return encode_chip(binary * 255 if encoding == "png" else binary, encoding)


def _mask_fields(generated: np.ndarray | None, truth: np.ndarray | None, encoding: str, mask_source: str
                 ) -> dict[str, Any]:
    """Metadata of a row's masks: shape/encoding shared by both, ``pv_fraction`` of the training target (the
    truth where present), ``mask_source`` of the generated mask (``ground_truth`` for a truth-only row)."""
    if generated is not None and truth is not None and generated.shape != truth.shape:
        raise ValueError(f"generated mask {generated.shape} and truth {truth.shape} disagree")
    target = truth if truth is not None else generated
    if target is None:
        return {"mask_shape": None, "mask_encoding": None, "mask_source": None, "pv_fraction": None}
    return {
        "mask_shape": list(target.shape),
        "mask_encoding": encoding,
        "mask_source": mask_source if generated is not None else "ground_truth",
        "pv_fraction": float((target > 0).mean()),
    }


def _lineage(chip: Chip, created_at: dt.datetime) -> dict[str, Any]:
    """The row's lineage struct; every field null for rows not built from the lakehouse (Lance file format 2.0
    stores no struct validity, so the struct itself is never null)."""
    lineage = chip.extras.get("lineage")
    if lineage is None:
        return {field.name: None for field in LINEAGE_TYPE}
    return {field.name: None for field in LINEAGE_TYPE} | {"built_at": created_at} | lineage


def _msi_fields(msi: Chip | None) -> tuple[bytes | None, dict[str, Any]]:
    if msi is None:
        return None, {"msi_shape": None, "msi_dtype": None, "msi_bands": None}
    return encode_chip(msi.pixels, "raw"), {
        "msi_shape": list(msi.pixels.shape),
        "msi_dtype": msi.pixels.dtype.name,
        "msi_bands": list(msi.bands),
    }


def training_rows(
    sample_chips: list[Chip],
    sample_masks: dict[str, np.ndarray],
    truth_masks: dict[str, np.ndarray],
    ignore_masks: dict[str, np.ndarray],
    msi_chips: dict[str, Chip],
    sample_uuids: list[str],
    sample_centroids: np.ndarray,
    sample_s2_tokens: dict[int, np.ndarray],
    sample_h3_cells: np.ndarray,
    dataset_name: str,
    chip_encoding: str,
    mask_source: str,
    provenance_params: dict,
    h3_resolution: int = DEFAULT_H3_RESOLUTION,
) -> pa.Table:
    """One ``training_data`` row per chip; masks are stored 0/1 (``png``: 0/255; ignored pixels of a raw generated
    mask: ``MASK_IGNORE``), the generated one in
    ``generated_mask``, ground truth in ``truth_mask`` (never mixed). The schema has one
    ``s2_token_l<level>`` field per level of ``sample_s2_tokens`` and an ``h3_<h3_resolution>`` field."""
    levels = sorted(sample_s2_tokens)
    created_at = dt.datetime.now(dt.timezone.utc)
    rows = []
    for index, chip in enumerate(sample_chips):
        sample_id = chip.extras["sample_id"]
        generated, truth = sample_masks.get(sample_id), truth_masks.get(sample_id)
        mask_bytes = _encode_mask(generated, chip_encoding, ignore_masks.get(sample_id))
        mask_meta = _mask_fields(generated, truth, chip_encoding, mask_source)
        msi_bytes, msi_meta = _msi_fields(msi_chips.get(sample_id))
        metadata = {
            "dataset": dataset_name,
            "source_file": chip.source,
            "sample_id": sample_id,
            **{f"s2_token_l{level}": str(sample_s2_tokens[level][index]) for level in levels},
            f"h3_{h3_resolution}": str(sample_h3_cells[index]),
            "centroid_lat": float(sample_centroids[index, 1]),
            "centroid_lon": float(sample_centroids[index, 0]),
            "acquired_at": _timestamp(chip.acquired_at),
            "sensor": chip.sensor,
            "gsd_m": float(chip.gsd_m),
            "crs": chip.crs.to_string(),
            "transform": list(chip.transform)[:6],
            "vhr_shape": list(chip.pixels.shape),
            "vhr_dtype": chip.pixels.dtype.name,
            "vhr_encoding": chip_encoding,
            **msi_meta,
            **mask_meta,
            "provenance": {
                "backend": provenance_params.get("backend") if mask_bytes is not None else None,
                "backend_version": provenance_params.get("backend_version"),
                "params_json": json.dumps({**provenance_params, **chip.extras.get("provenance", {}),
                                           "georeferenced": chip.georeferenced}, sort_keys=True),
                "round": int(provenance_params.get("round", 0)),
                "source_detection": chip.extras.get("source_detection"),
                "created_at": created_at,
                "code_version": __version__,
            },
        }
        rows.append(
            {
                "uuid": sample_uuids[index],
                "prompt_geometry": chip.extras["prompt_wkb"],
                "vhr_image_chip": encode_chip(chip.pixels, chip_encoding),
                "generated_mask": mask_bytes,
                "msi_image_chip": msi_bytes,
                "metadata": metadata,
                "truth_mask": _encode_mask(truth, chip_encoding),
                "lineage": _lineage(chip, created_at),
            }
        )
    return pa.Table.from_pylist(rows, schema=training_data_schema(levels, h3_resolution))

"""Hamilton dataflow: validated region detections → ``training_data`` samples (chips with masks, hard negatives).

Inputs: ``detections`` (GeoDataFrame, EPSG:4326, one row per detection with ``detection_id`` and ``geometry``),
``validation_decisions`` (Arrow table aligned with ``detections``: ``decision`` accept | reject | needs_review),
``detection_tiles`` ({detection_id: the image :class:`~aegir.utils.types.Chip` that holds the detection}),
``backfill_chip_px`` (chip side in pixels) and ``mask_backend`` (a Mask Factory backend: ``model`` or ``sam``).

Accepted detections become chips centred on the detection with a refined mask (the backend prompted by the
detection's bounding box); rejected ones become hard negatives: the same kind of chip with an all-background
mask. ``needs_review`` detections are left for a person. Every sample's ``sample_id`` is its ``detection_id``
(so re-running a round upserts the same rows) and ``extras["source_detection"]`` records where it came from.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import shapely

from aegir.masks.prompts import PromptError, georeferenced_prompts
from aegir.utils import geo
from aegir.utils.types import Chip


def _with_decision(detections: gpd.GeoDataFrame, validation_decisions: pa.Table, decision: str) -> gpd.GeoDataFrame:
    if len(detections) != validation_decisions.num_rows:
        raise ValueError(f"{len(detections)} detections but {validation_decisions.num_rows} validation decisions")
    keep = np.asarray(validation_decisions["decision"].to_pylist()) == decision
    return detections[keep].reset_index(drop=True)


def _top_scores(frame: gpd.GeoDataFrame, limit: int) -> gpd.GeoDataFrame:
    return frame.sort_values("score", ascending=False, kind="stable").head(limit).reset_index(drop=True)


def accepted_detections(detections: gpd.GeoDataFrame, validation_decisions: pa.Table,
                        max_backfill: int = 64) -> gpd.GeoDataFrame:
    """The (at most ``max_backfill``, highest score first) detections whose decision is ``accept``."""
    return _top_scores(_with_decision(detections, validation_decisions, "accept"), max_backfill)


def rejected_detections(detections: gpd.GeoDataFrame, validation_decisions: pa.Table,
                        max_hard_negatives: int = 64) -> gpd.GeoDataFrame:
    """The (at most ``max_hard_negatives``) rejected detections the model was surest of: the hardest negatives."""
    return _top_scores(_with_decision(detections, validation_decisions, "reject"), max_hard_negatives)


def _centred_chips(frame: gpd.GeoDataFrame, detection_tiles: dict[str, Chip], size_px: int) -> list[Chip]:
    chips = []
    for detection_id, geometry in zip(frame["detection_id"].astype(str), frame.geometry):
        tile = detection_tiles.get(detection_id)
        if tile is None:
            continue
        centre = shapely.centroid(geometry)
        chip = geo.chip_centred_on(tile, centre, size_px)
        extras = {**chip.extras, "sample_id": str(detection_id), "source_detection": str(detection_id),
                  "prompt_wkb": shapely.to_wkb(geometry)}
        chips.append(dataclasses.replace(chip, extras=extras))
    return chips


def accepted_chips(accepted_detections: gpd.GeoDataFrame, detection_tiles: dict[str, Chip], backfill_chip_px: int = 256) -> list[Chip]:
    """(3, size, size) chips centred on each accepted detection, cut from its tile (edges padded as nodata)."""
    return _centred_chips(accepted_detections, detection_tiles, backfill_chip_px)


def hard_negative_chips(rejected_detections: gpd.GeoDataFrame, detection_tiles: dict[str, Chip], backfill_chip_px: int = 256) -> list[Chip]:
    """(3, size, size) chips centred on each rejected detection."""
    return _centred_chips(rejected_detections, detection_tiles, backfill_chip_px)


def refined_masks(accepted_chips: list[Chip], mask_backend: Any) -> dict[str, np.ndarray]:
    """sample_id → (H, W) uint8 0/1 mask from ``mask_backend`` prompted by the detection's bounding box
    (all-zero when the box falls outside the chip)."""
    out = {}
    for chip in accepted_chips:
        box = shapely.envelope(shapely.from_wkb(chip.extras["prompt_wkb"]))
        try:
            prompts = georeferenced_prompts(chip, [box], [chip.extras["sample_id"]])
        except PromptError:
            out[chip.extras["sample_id"]] = np.zeros((chip.height, chip.width), np.uint8)
            continue
        result = mask_backend.segment(np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1)), prompts)
        out[chip.extras["sample_id"]] = result.masks.any(axis=0).astype(np.uint8)
    return out


def hard_negative_masks(hard_negative_chips: list[Chip]) -> dict[str, np.ndarray]:
    """sample_id → (H, W) all-background uint8 mask."""
    return {chip.extras["sample_id"]: np.zeros((chip.height, chip.width), np.uint8) for chip in hard_negative_chips}

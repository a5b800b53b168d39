"""Hamilton dataflow: one catalogued image + its lakehouse prompts → Mask Factory masks → training samples.

Inputs: ``image_chip`` (the whole image, :class:`~aegir.utils.types.Chip`), ``catalog_prompt_rows`` (this image's rows
of :func:`aegir.dataflows.label_image_join.image_prompts` plus ``label_wkb``, the label geometry WKB EPSG:4326),
``mask_backend`` (a :class:`~aegir.masks.base.MaskBackend`), ``truth_mask`` ((H, W) pixel ground truth or None),
``chip_size`` (pixels; None = one sample per whole image), ``build_lineage`` (dict of the build's lineage fields:
ducklake_snapshot_id, build_id, backend, backend_version, backend_params_json).

Every prompt of the image goes to the backend in one call. A polygon label's prompt is its pixel box with the
polygon as a prior (the backend still makes the mask from the pixels). Output ``lakehouse_samples``: chips (one per
label centred on it, shifted to stay inside the image, or the whole image), their generated masks (union of the
prompt masks inside the window) and ground-truth windows, each chip carrying ``uuid``, ``sample_id``,
``prompt_wkb`` and ``lineage`` extras for :mod:`aegir.dataflows.training_sample_builder`.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import shapely

from aegir.masks.base import MaskResult
from aegir.masks.prompts import PixelPrompts, PromptError, pixel_prompts
from aegir.utils import geo
from aegir.utils.types import Chip

LAKEHOUSE_NAMESPACE = uuid.UUID("c9f3a4d2-61b8-4e0f-8d2a-5e7b9a1c3f60")


def _prior(wkb: bytes | None, height: int, width: int) -> np.ndarray | None:
    if wkb is None:
        return None
    from rasterio.features import rasterize

    geometry = shapely.from_wkb(wkb)
    if geometry.is_empty:
        return None
    return rasterize([geometry], out_shape=(height, width), fill=0, default_value=1, dtype="uint8").astype(bool)


def prompt_set(image_chip: Chip, catalog_prompt_rows: pa.Table) -> dict[str, Any]:
    """{"prompts": PixelPrompts of the usable rows (boxes, then points), "rows": their row indexes in that order,
    "skipped": [{"prompt", "reason"}]}; each row is checked alone, so one bad prompt skips only itself."""
    boxes, points, box_rows, point_rows, skipped = [], [], [], [], []
    for i, row in enumerate(catalog_prompt_rows.to_pylist()):
        try:
            if row["prompt_kind"] == "point":
                pixel_prompts(image_chip.height, image_chip.width, points=[[row["x"], row["y"]]], ids=[row["uuid"]])
                points.append((row["x"], row["y"]))
                point_rows.append(i)
            else:
                box = [row["xmin"], row["ymin"], row["xmax"], row["ymax"]]
                pixel_prompts(image_chip.height, image_chip.width, boxes=[box], ids=[row["uuid"]])
                boxes.append(box)
                box_rows.append(i)
        except PromptError as exc:
            skipped.append({"prompt": row["uuid"], "reason": str(exc)})
    order = box_rows + point_rows
    uuids = catalog_prompt_rows["uuid"].to_pylist()
    priors = [_prior(catalog_prompt_rows["polygon_pixels_wkb"][i].as_py(), image_chip.height, image_chip.width)
              for i in order]
    prompts = pixel_prompts(image_chip.height, image_chip.width, boxes, points, [uuids[i] for i in order],
                            **({"priors": priors} if any(p is not None for p in priors) else {}))
    return {"prompts": prompts, "rows": order, "skipped": skipped}


def unusable_prompts(prompt_set: dict[str, Any]) -> list[dict]:
    """Prompts of this image that could not be used, with the reason."""
    return prompt_set["skipped"]


def prompt_masks(image_chip: Chip, prompt_set: dict[str, Any], mask_backend: Any) -> MaskResult:
    """The backend's (N, H, W) masks for all of the image's usable prompts, in one call."""
    prompts: PixelPrompts = prompt_set["prompts"]
    if len(prompts) == 0:
        return MaskResult.empty(image_chip.height, image_chip.width)
    rgb = np.ascontiguousarray(np.moveaxis(image_chip.rgb8(), 0, -1))
    return mask_backend.segment(rgb, prompts)


def sample_windows(image_chip: Chip, catalog_prompt_rows: pa.Table, prompt_set: dict[str, Any],
                   chip_size: int | None = None) -> list[tuple[int, int, int, int, int | None]]:
    """(col0, row0, width, height, prompt row or None) of every sample: the whole image, or a ``chip_size``²
    window centred on each usable prompt, shifted to lie inside the image when the image is large enough."""
    if chip_size is None:
        return [(0, 0, image_chip.width, image_chip.height, None)]
    prompts: PixelPrompts = prompt_set["prompts"]
    out = []
    for k, row in enumerate(prompt_set["rows"]):
        rows, cols = prompts.pixel_slices(k)
        cx, cy = (cols.start + cols.stop) // 2, (rows.start + rows.stop) // 2
        col0 = min(max(cx - chip_size // 2, 0), max(image_chip.width - chip_size, 0))
        row0 = min(max(cy - chip_size // 2, 0), max(image_chip.height - chip_size, 0))
        out.append((col0, row0, chip_size, chip_size, row))
    return out


def _window(array: np.ndarray, col0: int, row0: int, width: int, height: int) -> np.ndarray:
    out = np.zeros((height, width), array.dtype)
    part = array[row0:row0 + height, col0:col0 + width]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def _prompt_json(row: dict, prompts: PixelPrompts, k: int, col0: int, row0: int) -> dict:
    item = {"dataset": row["dataset"], "row_hash": row["row_hash"], "kind": row["prompt_kind"],
            "clipped": bool(row["clipped"])}
    if prompts.is_box[k]:
        x0, y0, x1, y1 = prompts.boxes[k]
        item["box"] = [round(float(x0) - col0, 3), round(float(y0) - row0, 3), round(float(x1) - col0, 3),
                       round(float(y1) - row0, 3)]
    else:
        item["point"] = [round(float(prompts.points[k, 0]) - col0, 3), round(float(prompts.points[k, 1]) - row0, 3)]
    return item


def lakehouse_samples(image_chip: Chip, catalog_prompt_rows: pa.Table, prompt_set: dict[str, Any],
                      prompt_masks: MaskResult, sample_windows: list, truth_mask: np.ndarray | None,
                      build_lineage: dict[str, Any]) -> dict[str, Any]:
    """{"chips": [Chip], "masks": {sample_id: (h, w) uint8}, "truth": {sample_id: (h, w) uint8}} (see module)."""
    rows = catalog_prompt_rows.to_pylist()
    prompts: PixelPrompts = prompt_set["prompts"]
    image_id = rows[0]["image_id"] if rows else None
    datasets = "+".join(sorted({r["dataset"] for r in rows}))
    chips, masks, truth = [], {}, {}
    spans = [prompts.pixel_slices(k) for k in range(len(prompts))]
    extents = np.array([(c.start, r.start, c.stop, r.stop) for r, c in spans], dtype=np.int64).reshape(-1, 4)
    for col0, row0, width, height, centre in sample_windows:
        members = np.flatnonzero((extents[:, 0] < col0 + width) & (extents[:, 2] > col0)
                                 & (extents[:, 1] < row0 + height) & (extents[:, 3] > row0)).tolist()
        union = prompt_masks.masks[members].any(axis=0) if members else np.zeros(prompt_masks.masks.shape[1:], bool)
        key = "whole" if centre is None else rows[centre]["row_hash"]
        sample_id = str(uuid.uuid5(LAKEHOUSE_NAMESPACE, f"{datasets}:{image_id}:{key}"))
        chip = image_chip if centre is None else geo.chip_window(image_chip, col0, row0, width)
        used = [prompt_set["rows"][k] for k in members]
        prompt_wkb = rows[centre]["label_wkb"] if centre is not None else geo.chip_footprint_wkb(chip)
        lineage = {
            "label_datasets": sorted({rows[i]["dataset"] for i in used}),
            "label_row_hashes": [rows[i]["row_hash"] for i in used],
            "image_id": image_id, "image_uri": rows[0]["image_uri"] if rows else None,
            "prompt_kinds": [rows[i]["prompt_kind"] for i in used],
            "prompts_json": json.dumps([_prompt_json(rows[prompt_set["rows"][k]], prompts, k, col0, row0)
                                        for k in members]),
            **build_lineage,
        }
        chips.append(dataclasses.replace(chip, extras={**chip.extras, "sample_id": sample_id, "uuid": sample_id,
                                                       "prompt_wkb": prompt_wkb, "lineage": lineage,
                                                       "provenance": {"image_id": image_id, "window": [col0, row0]}}))
        masks[sample_id] = _window(union.astype(np.uint8), col0, row0, width, height)
        if truth_mask is not None:
            truth[sample_id] = _window(truth_mask, col0, row0, width, height)
    return {"chips": chips, "masks": masks, "truth": truth}

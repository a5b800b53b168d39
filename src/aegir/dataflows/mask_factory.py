"""Hamilton dataflow: one image chip + its prompts → one mask per prompt, the union mask, scored polygons.

Inputs: ``image_chip`` (:class:`~aegir.utils.types.Chip`), ``image_prompt_rows`` (the rows of
:func:`aegir.store.mask_files.read_prompt_file` that belong to this image: pixel boxes/points or EPSG:4326
geometries), ``mask_backend`` (a :class:`~aegir.masks.base.MaskBackend`). Every prompt of the image goes to the
backend in one call (one pass over the image). Prompts that cannot be used (zero area, outside the image) are
listed in ``skipped_prompts`` and the others still run.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from aegir.masks.base import MaskResult
from aegir.masks.prompts import PixelPrompts, PromptError, georeferenced_prompts, pixel_prompts
from aegir.masks.refine import rectangularity
from aegir.utils import geo
from aegir.utils.types import Chip


def image_rgb(image_chip: Chip) -> np.ndarray:
    """(H, W, 3) uint8 RGB view of the chip that backends segment."""
    return np.ascontiguousarray(np.moveaxis(image_chip.rgb8(), 0, -1))


def prompt_conversion(image_chip: Chip, image_prompt_rows: pd.DataFrame) -> dict[str, Any]:
    """{"prompts": PixelPrompts of the usable rows, "skipped": [{"prompt", "reason"}]}; each row checked alone."""
    boxes, points, box_ids, point_ids, clipped, skipped = [], [], [], [], [], []
    for row in image_prompt_rows.itertuples(index=False):
        name = str(row.prompt_id)
        try:
            geometry = getattr(row, "geometry", None)
            if geometry is not None and not (isinstance(geometry, float) and np.isnan(geometry)):
                one = georeferenced_prompts(image_chip, [geometry], [name])
            elif row.kind == "box":
                one = pixel_prompts(image_chip.height, image_chip.width, boxes=[[row.xmin, row.ymin, row.xmax,
                                                                                  row.ymax]], ids=[name])
            else:
                one = pixel_prompts(image_chip.height, image_chip.width, points=[[row.x, row.y]], ids=[name])
        except PromptError as exc:
            skipped.append({"prompt": name, "reason": str(exc)})
            continue
        if one.is_box[0]:
            boxes.append(one.boxes[0]); box_ids.append(name)
        else:
            points.append(one.points[0]); point_ids.append(name)
        clipped.append((name, bool(one.clipped[0])))
    prompts = pixel_prompts(image_chip.height, image_chip.width, boxes, points, box_ids + point_ids)
    flags = dict(clipped)
    prompts = PixelPrompts(prompts.boxes, prompts.points, prompts.ids, prompts.height, prompts.width,
                           np.array([flags[i] for i in prompts.ids], bool))
    return {"prompts": prompts, "skipped": skipped}


def chip_prompts(prompt_conversion: dict[str, Any]) -> PixelPrompts:
    """The image's usable prompts in pixel coordinates (boxes first, then points)."""
    return prompt_conversion["prompts"]


def skipped_prompts(prompt_conversion: dict[str, Any]) -> list[dict]:
    """Prompts of this image that could not be used, with the reason."""
    return prompt_conversion["skipped"]


def mask_result(image_rgb: np.ndarray, chip_prompts: PixelPrompts, mask_backend: Any) -> MaskResult:
    """The backend's masks and scores for all of the image's prompts, in one call."""
    return mask_backend.segment(image_rgb, chip_prompts)


def union_mask(mask_result: MaskResult) -> np.ndarray:
    """(H, W) uint8 0/1: PV wherever any prompt's mask is."""
    return mask_result.union.astype(np.uint8)


def mask_scores(mask_result: MaskResult, chip_prompts: PixelPrompts, image_chip: Chip) -> pd.DataFrame:
    """One row per prompt: prompt_id, kind, clipped, confidence, stability, area_px, area_m2, rectangularity."""
    area_px = mask_result.masks.sum(axis=(1, 2))  # (N,); N may be 0 when no prompt of the image is usable
    gsd = image_chip.gsd_m if np.isfinite(image_chip.gsd_m) else np.nan
    return pd.DataFrame({
        "prompt_id": list(chip_prompts.ids),
        "kind": np.where(chip_prompts.is_box, "box", "point"),
        "clipped": chip_prompts.clipped,
        "confidence": mask_result.confidence.astype(float),
        "stability": mask_result.stability.astype(float),
        "area_px": area_px.astype(np.int64),
        "area_m2": area_px * gsd**2,
        "rectangularity": [rectangularity(m) for m in mask_result.masks],
    })


def mask_polygons(mask_result: MaskResult, mask_scores: pd.DataFrame, image_chip: Chip,
                  mask_backend: Any) -> Any:
    """GeoDataFrame, one (multi)polygon per non-empty prompt mask with its scores, EPSG:4326 (pixel
    coordinates and no CRS when the image has no georeference)."""
    import geopandas as gpd
    import shapely
    from rasterio.features import shapes
    from rasterio.warp import transform_geom

    georef = image_chip.crs != geo.PIXEL_GRID_CRS
    geometries, keep = [], []
    for i, mask in enumerate(mask_result.masks):
        if not mask.any():
            continue
        parts = [shapely.geometry.shape(g) for g, v in shapes(mask.astype(np.uint8), mask=mask,
                                                               transform=image_chip.transform) if v == 1]
        geometry = shapely.union_all(parts)
        if georef:
            geometry = shapely.geometry.shape(transform_geom(image_chip.crs, "EPSG:4326",
                                                             shapely.geometry.mapping(geometry)))
        geometries.append(geometry)
        keep.append(i)
    frame = mask_scores.iloc[keep].reset_index(drop=True)
    frame.insert(0, "image", image_chip.source)
    frame["backend"] = mask_backend.name
    frame["backend_version"] = mask_backend.version
    frame["georeferenced"] = bool(image_chip.georeferenced)
    return gpd.GeoDataFrame(frame, geometry=geometries, crs="EPSG:4326" if georef else None)

"""``aegir predict`` / ``aegir evaluate``: a trained checkpoint over a folder of image files.

Images (BMP / PNG / JPEG / GeoTIFF) are read as chips by :func:`aegir.store.mask_files.read_image_chip` and fed
to the model as uint8 RGB (:meth:`Chip.rgb8`); images larger than the model's tile (1024 px) are predicted in
overlapping, batched tiles blended by :mod:`aegir.training.predictor` (raised-cosine weights). Masks are written
as ``OUT/<stem>.png`` (one band, uint8 0/255, the image's size) and, when the input file carries a georeference
(GeoTIFF tags, world file, .aux.xml), also as ``OUT/geotiff/<stem>.tif`` on the input's grid and CRS — the same
layout as ``aegir masks generate``.

Metrics: :mod:`aegir.utils.mask_metrics` (``mean_iou`` over images, ``pixel_iou`` / ``f1`` / ``precision`` /
``recall`` over all pixels); against box annotations (``transfer_box_scores``):
:func:`aegir.dataflows.transfer_scores.box_detection_scores` (box recall, component precision, F1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from aegir.dataflows.transfer_scores import box_detection_scores
from aegir.dataflows.validation import object_level_scores
from aegir.store import image_files, mask_files
from aegir.utils.mask_metrics import mask_set_metrics
from aegir.utils.types import Chip


def load_rgb_model(checkpoint: str | Path, device: str | None = None):
    """A :class:`~aegir.training.inference_model.SegmentationModel` that takes RGB chips (clear error otherwise)."""
    from aegir.training.inference_model import load_segmentation_model

    model = load_segmentation_model(str(checkpoint), device)
    if model.config.get("inputs", "vhr") != "vhr" or model.in_channels != 3:
        raise ValueError(f"{checkpoint}: the model takes {model.config.get('inputs')} inputs "
                         f"({model.in_channels} bands); predicting on image files needs a VHR (RGB) model")
    return model


def chip_probability(model, chip: Chip) -> np.ndarray:
    """(H, W) float32 PV probability of an image chip (``SegmentationModel.predict_proba``: tiled, blended)."""
    return model.predict_proba(chip.rgb8())


def _chips(images_dir: str | Path, skipped: list[dict], stems: set[str] | None = None) -> Iterator[tuple[Path, Chip]]:
    for path in image_files.list_image_files(images_dir):
        if stems is not None and path.stem not in stems:
            continue
        try:
            yield path, mask_files.read_image_chip(path)
        except (ValueError, OSError) as exc:
            skipped.append({"file": str(path), "reason": str(exc)})


def predict_folder(checkpoint: str | Path, images_dir: str | Path, out_dir: str | Path,
                   threshold: float = 0.5, device: str | None = None, progress=None) -> dict:
    """Write ``OUT/<stem>.png`` (and ``OUT/geotiff/<stem>.tif`` for georeferenced inputs) for every image.

    Returns ``{"out_dir", "written": {stem: png path}, "geotiff": {stem: tif path}, "skipped": [{file, reason}]}``;
    ``progress(n)`` is called after each image."""
    model = load_rgb_model(checkpoint, device)
    out = Path(out_dir)
    written, geotiffs, skipped = {}, {}, []
    for path, chip in _chips(images_dir, skipped):
        try:
            mask = chip_probability(model, chip) >= threshold
        except ValueError as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        written[path.stem] = str(mask_files.write_mask_png(mask, out / f"{path.stem}.png"))
        if chip.georeferenced and chip.extras.get("grid_convention") == "file":
            geotiffs[path.stem] = str(mask_files.write_mask_geotiff(mask, chip, out / "geotiff" / f"{path.stem}.tif"))
        if progress:
            progress(1)
    return {"out_dir": str(out), "written": written, "geotiff": geotiffs, "skipped": skipped}


def evaluate_folder(checkpoint: str | Path, images_dir: str | Path, masks_dir: str | Path,
                    stems: Iterable[str] | None = None, threshold: float = 0.5, device: str | None = None,
                    model=None) -> dict:
    """Predict every image that has a mask (matched by stem; only ``stems`` when given) and score it."""
    model = model or load_rgb_model(checkpoint, device)
    masks = image_files.mask_files_by_stem(masks_dir)
    problems: list[dict] = []
    unmatched: list[str] = []

    def pairs():
        for path, chip in _chips(images_dir, problems, set(stems) if stems is not None else None):
            if path.stem not in masks:
                unmatched.append(path.stem)
                continue
            try:
                truth = image_files.read_mask(masks[path.stem]) > 0
                proba = chip_probability(model, chip)
            except (ValueError, OSError) as exc:
                problems.append({"file": str(path), "reason": str(exc)})
                continue
            if truth.shape != proba.shape:
                problems.append({"file": str(path), "reason": f"mask is {truth.shape}, image is {proba.shape}"})
                continue
            yield path.stem, proba >= threshold, truth

    result = mask_set_metrics(pairs())
    return result | {"unmatched_images": unmatched, "problems": problems, "checkpoint": str(checkpoint),
                     "data_version": model.data_version, "dataset_uri": model.dataset_uri}


def _component_polygons(mask: np.ndarray, x_offset: float) -> list:
    """Polygons (pixel units, shifted by ``x_offset``) of the 8-connected components of an (H, W) bool mask."""
    import shapely
    from affine import Affine
    from rasterio.features import shapes
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask, structure=np.ones((3, 3)))
    parts: dict[int, list] = {}
    for geometry, value in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=8,
                                  transform=Affine.translation(x_offset, 0)):
        parts.setdefault(int(value), []).append(shapely.geometry.shape(geometry))
    return [shapely.union_all(p) for p in parts.values()]


def scored_images(model, image_paths: list[Path], masks_by_stem: dict[str, Path], threshold: float = 0.5,
                  match_iou: float = 0.5) -> dict:
    """A loaded model on ``image_paths`` against their masks (by stem; images without one are left out): the
    pixel metrics of :func:`aegir.utils.mask_metrics.mask_set_metrics` plus ``object`` precision / recall / F1 at
    IoU ≥ ``match_iou`` (objects: 8-connected components; each image shifted apart so objects never meet)."""
    pairs = []
    for path in image_paths:
        if path.stem not in masks_by_stem:
            continue
        chip = mask_files.read_image_chip(path)
        pairs.append((path.stem, chip_probability(model, chip) >= threshold,
                      image_files.read_mask(masks_by_stem[path.stem]) > 0))
    detections, references = [], []
    for index, (_, pred, truth) in enumerate(pairs):
        offset = index * 2.0 * (pred.shape[1] + 1)
        detections += _component_polygons(pred, offset)
        references += _component_polygons(truth, offset)
    return mask_set_metrics(pairs) | {"object": object_level_scores(detections, references, match_iou)}


def object_and_pixel_scores(checkpoint: str | Path, images_dir: str | Path, masks_dir: str | Path,
                            stems: Iterable[str], threshold: float = 0.5, match_iou: float = 0.5,
                            device: str | None = None) -> dict:
    """Held-out evaluation against ground-truth masks, one prediction per image: the pixel metrics of
    :func:`aegir.utils.mask_metrics.mask_set_metrics` plus ``object``: precision / recall / F1 at IoU ≥
    ``match_iou`` (:func:`aegir.dataflows.validation.object_level_scores`), objects being the 8-connected
    components of the predicted and the true masks (pixel units; each image is shifted apart so objects of
    different images never meet)."""
    masks = image_files.mask_files_by_stem(masks_dir)
    wanted = set(stems)
    paths = [p for p in image_files.list_image_files(images_dir) if p.stem in wanted]
    return scored_images(load_rgb_model(checkpoint, device), paths, masks, threshold, match_iou)


def transfer_box_scores(model_or_checkpoint, images_dir: str | Path, annotations_csv: str | Path,
                        threshold: float = 0.5, device: str | None = "cpu") -> dict:
    """Transfer evaluation against box annotations (``filename,xmin,ymin,xmax,ymax`` pixels, e.g. NREL's
    ``annotations.csv``): every image of ``images_dir`` is predicted (probability ≥ ``threshold`` is PV) and scored
    by :func:`~aegir.dataflows.transfer_scores.box_detection_scores` (a box is found at ≥ 25 % cover, a component
    of ≥ 50 px is correct when it touches a box; images without boxes count for precision, annotated images
    missing from the folder count as missed boxes).

    ``model_or_checkpoint``: an object with ``predict_proba((3, H, W) uint8) -> (H, W)`` or a checkpoint path
    (:func:`load_rgb_model` on ``device``). Returns the scores plus ``images`` (count predicted), ``threshold``,
    ``missing_images`` (annotated stems with no readable image) and ``skipped`` ([{file, reason}])."""
    model = model_or_checkpoint if hasattr(model_or_checkpoint, "predict_proba") else load_rgb_model(
        model_or_checkpoint, device)
    boxes = mask_files.read_box_annotations(annotations_csv)
    skipped: list[dict] = []
    predicted = {}
    for path, chip in _chips(images_dir, skipped):
        try:
            predicted[path.stem] = np.asarray(chip_probability(model, chip)) >= threshold
        except ValueError as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
    scores = box_detection_scores(predicted, boxes)
    return scores | {"images": len(predicted), "threshold": threshold,
                     "missing_images": sorted(set(boxes) - set(predicted)), "skipped": skipped}

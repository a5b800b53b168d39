"""Transfer evaluation of a PV segmentation against box annotations (e.g. the NREL ``annotations.csv`` tiles).

Inputs: ``predicted`` (image stem → (H, W) bool PV mask) and ``boxes`` (image stem → (N, 4) float pixel boxes
``xmin, ymin, xmax, ymax``). Pure numpy / scipy, no I/O.

Rules:

* Box pixels: corners are rounded to the nearest integer (``np.rint``, half to even), ``xmax`` / ``ymax`` are
  exclusive (box = rows ``ymin:ymax``, columns ``xmin:xmax``) and the box is clipped to the image. A box left
  with no pixel (degenerate or outside the image) still counts in ``boxes`` and is never found.
* A box is FOUND when predicted PV covers ≥ ``min_cover`` of its pixels.
* A predicted component (8-connected) of ≥ ``min_component_px`` pixels is CORRECT when it shares at least one
  pixel with any box of its image; smaller components are ignored.
* An image with a prediction but no box counts for precision (all its components are wrong); an image with boxes
  but no prediction counts for recall (none of its boxes is found).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

_EIGHT = np.ones((3, 3), dtype=bool)


def _box_slices(boxes: np.ndarray, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """(row, column) slices of (N, 4) ``xmin, ymin, xmax, ymax`` pixel boxes on an (H, W) grid: corners rounded,
    max exclusive, clipped to the grid (an empty slice for a box with no pixel left)."""
    height, width = shape
    out = []
    for xmin, ymin, xmax, ymax in np.rint(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)).astype(np.int64):
        x0, x1 = int(np.clip(xmin, 0, width)), int(np.clip(xmax, 0, width))
        y0, y1 = int(np.clip(ymin, 0, height)), int(np.clip(ymax, 0, height))
        out.append((slice(y0, max(y0, y1)), slice(x0, max(x0, x1))))
    return out


def _image_box_scores(mask: np.ndarray, boxes: np.ndarray, min_cover: float = 0.25,
                     min_component_px: int = 50) -> dict[str, int]:
    """``{boxes, found, components, correct}`` of one (H, W) bool mask against its (N, 4) pixel boxes."""
    mask = np.asarray(mask, dtype=bool)
    slices = _box_slices(boxes, mask.shape)
    found = 0
    for rows, cols in slices:
        window = mask[rows, cols]
        found += int(window.size > 0 and window.sum() >= min_cover * window.size)
    labels, count = ndi.label(mask, structure=_EIGHT)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    kept = np.flatnonzero(sizes >= min_component_px)
    kept = kept[kept > 0]
    in_box = np.zeros(mask.shape, dtype=bool)
    for rows, cols in slices:
        in_box[rows, cols] = True
    touched = np.unique(labels[in_box & (labels > 0)])
    return {"boxes": len(slices), "found": found, "components": int(kept.size),
            "correct": int(np.isin(kept, touched).sum())}


def box_detection_scores(predicted: dict[str, np.ndarray], boxes: dict[str, np.ndarray], min_cover: float = 0.25,
                         min_component_px: int = 50) -> dict:
    """Box recall / component precision / F1 of PV masks against box annotations (rules in the module docstring).

    ``predicted``: image stem → (H, W) bool mask; ``boxes``: image stem → (N, 4) float ``xmin, ymin, xmax, ymax``
    in pixels. ``min_cover`` is a fraction of a box's pixels (0–1); ``min_component_px`` a pixel count.
    Returns ``{"boxes", "found", "recall", "components", "correct", "precision", "f1", "per_image": {stem:
    {boxes, found, components, correct}}}``; recall / precision are 0.0 when their denominator is 0, F1 is the
    harmonic mean (0.0 when both are 0).
    """
    per_image = {}
    for stem in sorted(set(predicted) | set(boxes)):
        image_boxes = boxes.get(stem, np.zeros((0, 4)))
        if stem in predicted:
            per_image[stem] = _image_box_scores(predicted[stem], image_boxes, min_cover, min_component_px)
        else:
            per_image[stem] = {"boxes": len(np.asarray(image_boxes).reshape(-1, 4)), "found": 0, "components": 0,
                               "correct": 0}
    totals = {key: sum(s[key] for s in per_image.values()) for key in ("boxes", "found", "components", "correct")}
    recall = totals["found"] / totals["boxes"] if totals["boxes"] else 0.0
    precision = totals["correct"] / totals["components"] if totals["components"] else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"boxes": totals["boxes"], "found": totals["found"], "recall": recall,
            "components": totals["components"], "correct": totals["correct"], "precision": precision, "f1": f1,
            "per_image": per_image}

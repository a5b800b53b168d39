"""Binary mask agreement: the one definition behind ``aegir masks evaluate``, ``aegir evaluate`` and the benchmarks.

Per image: ``iou`` and ``f1`` (an image where prediction and truth are both empty counts 1.0). Over a set:
``mean_iou`` / ``mean_f1`` (means of the per-image values) and ``pixel_iou`` / ``f1`` / ``precision`` /
``recall`` from the pixel counts summed over all images.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def image_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float | int]:
    """IoU, F1 and pixel counts of one (H, W) boolean prediction against its (H, W) boolean truth."""
    inter, union, total = int((pred & truth).sum()), int((pred | truth).sum()), int(pred.sum() + truth.sum())
    return {"iou": 1.0 if union == 0 else inter / union, "f1": 1.0 if total == 0 else 2 * inter / total,
            "pred_px": int(pred.sum()), "truth_px": int(truth.sum()), "tp": inter,
            "fp": int(pred.sum()) - inter, "fn": int(truth.sum()) - inter}


def mask_set_metrics(pairs: Iterable[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """Metrics of (stem, predicted bool mask, truth bool mask) pairs; ``None`` values when there are no pairs."""
    per_image = {stem: image_scores(pred, truth) for stem, pred, truth in pairs}
    values = list(per_image.values())
    tp, fp, fn = (sum(v[k] for v in values) for k in ("tp", "fp", "fn"))
    if not values:
        return {k: None for k in ("mean_iou", "mean_f1", "pixel_iou", "f1", "precision", "recall")} | {
            "images": 0, "per_image": {}}
    return {
        "mean_iou": float(np.mean([v["iou"] for v in values])),
        "mean_f1": float(np.mean([v["f1"] for v in values])),
        "pixel_iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / (tp + fn) if tp + fn else 1.0,
        "images": len(values),
        "per_image": per_image,
    }

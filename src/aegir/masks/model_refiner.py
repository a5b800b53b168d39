"""The ``model`` backend: a trained segmentation checkpoint of this project as a prompt-conditioned refiner.

The model predicts PV probability over the whole image once (:func:`aegir.training.predictor.blended_probabilities`
with a trained model's own tiling: one pass up to 1024 px, blended batched tiles beyond); each prompt's mask is the
pixels inside the prompt with probability ≥ ``threshold`` (box gating), refined like the offline backend's.
``confidence`` is the mean probability inside the mask (how sure the model is of what it kept); ``stability`` the
IoU of the masks at ``threshold`` ± 0.1. The model comes from a checkpoint through
:func:`~aegir.training.inference_model.load_segmentation_model`, or is any object with
``predict_batch(tiles (B, C, h, w)) → (B, h, w)`` or ``predict_proba(image (C, H, W) uint8) → (H, W) float32``.
Training is imported lazily (it imports torch).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aegir.masks.base import MaskBackendError, MaskResult
from aegir.masks.prompts import PixelPrompts
from aegir.masks.refine import refine_mask


class ModelRefinerBackend:
    name = "model"

    def __init__(self, model: Any, checkpoint: str | None = None, threshold: float = 0.5, morph_px: int = 3,
                 min_component_fraction: float = 0.02, point_box_px: int = 48) -> None:
        if not (hasattr(model, "predict_batch") or hasattr(model, "predict_proba")):
            raise MaskBackendError(f"model backend: {type(model).__name__} has neither predict_batch(tiles) "
                                   "nor predict_proba(image)")
        self.model = model
        self.checkpoint = checkpoint
        self.threshold = threshold
        self.morph_px = morph_px
        self.min_component_fraction = min_component_fraction
        self.point_box_px = point_box_px

    @property
    def version(self) -> str:
        return f"aegir-segmentation ({self.checkpoint or type(self.model).__name__})"

    @property
    def params(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "threshold": self.threshold, "morph_px": self.morph_px,
                "min_component_fraction": self.min_component_fraction, "point_box_px": self.point_box_px}

    def segment(self, image: np.ndarray, prompts: PixelPrompts) -> MaskResult:
        from aegir.training.predictor import blended_probabilities  # lazily: importing training imports torch

        height, width = image.shape[:2]
        n = len(prompts)
        if n == 0:
            return MaskResult.empty(height, width)
        masks = np.zeros((n, height, width), bool)
        confidence, stability = np.zeros(n), np.zeros(n)
        proba = blended_probabilities(np.ascontiguousarray(np.moveaxis(image, -1, 0)), self.model)
        for i in range(n):
            rows, cols = prompts.pixel_slices(i, self.point_box_px)
            local = proba[rows, cols]
            refined = refine_mask(local >= self.threshold, self.morph_px, True, self.min_component_fraction)
            masks[i, rows, cols] = refined
            confidence[i] = float(local[refined].mean()) if refined.any() else 0.0
            high, low = local >= self.threshold + 0.1, local >= self.threshold - 0.1
            stability[i] = float(high.sum() / low.sum()) if low.any() else 1.0
        return MaskResult(masks, confidence, stability)


def model_backend(checkpoint: str | None = None, model: Any = None, **options: Any) -> ModelRefinerBackend:
    """From a checkpoint file (via the training stage's loader) or an already built ``model`` object."""
    if model is None:
        if not checkpoint:
            raise MaskBackendError("model backend needs --checkpoint PATH (a segmentation checkpoint from "
                                   "`aegir train`)")
        try:
            from aegir.training.inference_model import load_segmentation_model
        except ImportError as exc:
            raise MaskBackendError(
                "model backend needs aegir.training.inference_model.load_segmentation_model (the training stage), "
                f"which is not available here: {exc}") from exc
        model = load_segmentation_model(checkpoint)
    return ModelRefinerBackend(model, checkpoint, **options)

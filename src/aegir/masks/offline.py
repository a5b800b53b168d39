"""The ``offline`` backend: a joint GrabCut over all of an image's prompts, then PV-aware refinement.

No downloaded weights. One colour model pass per image: inside every prompt is "probably PV", outside every
prompt (within a context margin around them) is "surely background", and OpenCV GrabCut (5-component RGB GMMs
+ graph cut) labels the prompt pixels. Fitting one background model to everything around the prompts is what
makes it work on PV: the gaps between panel rows look like the surroundings, not like panels. Point prompts seed
a small "surely PV" disk and a ``point_box_px`` square of "probably PV".

Scores: ``confidence`` is the mean posterior (from the final foreground/background GMMs) of the label each pixel
got inside the prompt; ``stability`` is the IoU of the prompt's mask after the last and the second-to-last
GrabCut iteration. Tuned on the Jiang PV01 tiles (every 4th tile held out): see ``bench/mask_quality.py``.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from aegir.masks.base import MaskResult
from aegir.masks.prompts import PixelPrompts
from aegir.masks.refine import refine_mask

_GMM_K = 5


class OfflineGrabCutBackend:
    """Joint GrabCut + refinement. Options are the tuned defaults; ``params`` records them for provenance."""

    name = "offline"

    def __init__(
        self,
        iterations: int = 5,
        context_px: int | None = None,
        morph_px: int = 3,
        fill_holes: bool = True,
        min_component_fraction: float = 0.02,
        min_fill_fraction: float = 0.15,
        regularise: bool = False,
        point_box_px: int = 48,
        point_radius_px: int = 3,
    ) -> None:
        if iterations < 2:
            raise ValueError("offline backend: iterations must be >= 2 (stability compares the last two)")
        self.iterations = iterations
        self.context_px = context_px
        self.morph_px = morph_px
        self.fill_holes = fill_holes
        self.min_component_fraction = min_component_fraction
        self.min_fill_fraction = min_fill_fraction
        self.regularise = regularise
        self.point_box_px = point_box_px
        self.point_radius_px = point_radius_px

    @property
    def version(self) -> str:
        return f"grabcut-joint-1 (opencv {cv2.__version__})"

    @property
    def params(self) -> dict[str, Any]:
        keys = ("iterations", "context_px", "morph_px", "fill_holes", "min_component_fraction", "min_fill_fraction",
                "regularise", "point_box_px", "point_radius_px")
        return {key: getattr(self, key) for key in keys}

    def segment(self, image: np.ndarray, prompts: PixelPrompts) -> MaskResult:
        """One mask per prompt (see the module docstring) for an (H, W, 3) uint8 RGB image."""
        height, width = image.shape[:2]
        n = len(prompts)
        if n == 0:
            return MaskResult.empty(height, width)
        masks = np.zeros((n, height, width), bool)
        regions = [prompts.pixel_slices(i, self.point_box_px) for i in range(n)]
        rows0, rows1, cols0, cols1 = self._window(regions, height, width)
        crop = np.ascontiguousarray(image[rows0:rows1, cols0:cols1, ::-1])  # BGR for OpenCV
        seed = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        for rows, cols in regions:
            seed[rows.start - rows0:rows.stop - rows0, cols.start - cols0:cols.stop - cols0] = cv2.GC_PR_FGD
        for i in np.flatnonzero(~prompts.is_box):
            x, y = prompts.points[i]
            cv2.circle(seed, (int(x) - cols0, int(y) - rows0), self.point_radius_px, int(cv2.GC_FGD), -1)
        before, after, posterior, fallback = self._grabcut(crop, seed)
        confidence = np.zeros(n)
        stability = np.zeros(n)
        for i, (rows, cols) in enumerate(regions):
            local = (slice(rows.start - rows0, rows.stop - rows0), slice(cols.start - cols0, cols.stop - cols0))
            raw = after[local]
            refined = refine_mask(raw, self.morph_px, self.fill_holes, self.min_component_fraction, self.regularise)
            if refined.mean() < self.min_fill_fraction:  # the colour model found ~nothing: keep the whole prompt
                refined = np.ones_like(refined)
            masks[i, rows, cols] = refined
            if fallback:
                continue
            post = posterior[local]
            confidence[i] = float(np.where(refined, post, 1.0 - post).mean())
            a, b = before[local], raw
            union = np.logical_or(a, b).sum()
            stability[i] = 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
        return MaskResult(masks, confidence, stability, {"fallback_whole_prompt": fallback})

    def _window(self, regions, height: int, width: int) -> tuple[int, int, int, int]:
        """The pixel window GrabCut runs on: the whole image, or the prompts' extent plus ``context_px``."""
        if self.context_px is None:
            return 0, height, 0, width
        pad = self.context_px
        return (max(min(r.start for r, _ in regions) - pad, 0), min(max(r.stop for r, _ in regions) + pad, height),
                max(min(c.start for _, c in regions) - pad, 0), min(max(c.stop for _, c in regions) + pad, width))

    def _grabcut(self, crop: np.ndarray, seed: np.ndarray):
        """(mask after iterations-1, mask after iterations, foreground posterior, fell back?)."""
        background = seed == cv2.GC_BGD
        maybe = seed != cv2.GC_BGD
        if background.sum() < 2 * _GMM_K * 10 or maybe.sum() < 2 * _GMM_K:
            # prompts cover (nearly) the whole window: no background to learn from → the prompts as they are
            return maybe, maybe, np.full(seed.shape, 0.5), True
        bgd, fgd = np.zeros((1, 65)), np.zeros((1, 65))
        mask = seed.copy()
        cv2.grabCut(crop, mask, None, bgd, fgd, self.iterations - 1, cv2.GC_INIT_WITH_MASK)
        before = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        cv2.grabCut(crop, mask, None, bgd, fgd, 1, cv2.GC_EVAL)
        after = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        pixels = crop.reshape(-1, 3).astype(np.float64)
        p_fg, p_bg = _gmm_density(fgd, pixels), _gmm_density(bgd, pixels)
        posterior = (p_fg / np.maximum(p_fg + p_bg, 1e-300)).reshape(seed.shape)
        return before, after, posterior, False


def _gmm_density(model: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Density of an OpenCV GrabCut GMM (65 numbers: 5 weights, 5x3 means, 5x3x3 covariances) at BGR pixels."""
    model = model.ravel()
    weights = model[:_GMM_K]
    means = model[_GMM_K:4 * _GMM_K].reshape(_GMM_K, 3)
    covs = model[4 * _GMM_K:].reshape(_GMM_K, 3, 3)
    total = np.zeros(len(pixels))
    for k in range(_GMM_K):
        if weights[k] <= 0:
            continue
        cov = covs[k] + np.eye(3) * 1e-3
        inv = np.linalg.inv(cov)
        det = max(np.linalg.det(cov), 1e-12)
        diff = pixels - means[k]
        mahal = np.einsum("ij,jk,ik->i", diff, inv, diff)
        total += weights[k] * np.exp(-0.5 * mahal) / np.sqrt((2 * np.pi) ** 3 * det)
    return total

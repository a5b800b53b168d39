"""PV-aware mask refinement and per-mask shape scores.

PV arrays are compact, hole-free, rectangular: refinement closes/opens with a small square, fills holes, drops
specks (components smaller than a fraction of the prompt area) and can snap each component to its minimum-area
rotated rectangle when it already is nearly one (``regularise``).
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi


def refine_mask(
    mask: np.ndarray,
    morph_px: int = 3,
    fill_holes: bool = True,
    min_component_fraction: float = 0.02,
    regularise: bool = False,
    regularise_min_rectangularity: float = 0.85,
) -> np.ndarray:
    """A refined copy of a (h, w) bool mask (usually one prompt's box crop)."""
    out = mask.astype(bool)
    if morph_px > 1 and min(out.shape) > 2 * morph_px:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (morph_px, morph_px))
        out = cv2.morphologyEx(out.astype(np.uint8), cv2.MORPH_CLOSE, kernel)
        out = cv2.morphologyEx(out, cv2.MORPH_OPEN, kernel).astype(bool)
    if fill_holes:
        out = ndi.binary_fill_holes(out)
    labels, n = ndi.label(out)
    if n:
        sizes = ndi.sum(out, labels, np.arange(1, n + 1))
        keep = np.r_[False, sizes >= max(min_component_fraction * out.size, 1.0)]
        out = keep[labels]
    if regularise and out.any():
        out = _regularise(out, regularise_min_rectangularity)
    return out


def _regularise(mask: np.ndarray, min_rectangularity: float) -> np.ndarray:
    """Each component replaced by its minimum-area rotated rectangle when its rectangularity ≥ the threshold."""
    labels, n = ndi.label(mask)
    out = np.zeros_like(mask)
    for index in range(1, n + 1):
        component = labels == index
        rect_mask, rectangularity = _min_area_rect(component)
        out |= rect_mask if rectangularity >= min_rectangularity else component
    return out


def _min_area_rect(component: np.ndarray) -> tuple[np.ndarray, float]:
    """(the component's min-area rotated rectangle as a mask, area / rectangle area)."""
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = np.concatenate(contours).reshape(-1, 2).astype(np.float32)
    rect = cv2.minAreaRect(points)
    corners = cv2.boxPoints(rect)
    rect_mask = np.zeros(component.shape, np.uint8)
    cv2.fillPoly(rect_mask, [np.round(corners).astype(np.int32)], 1)
    rect_area = max(float(rect_mask.sum()), 1.0)
    return rect_mask.astype(bool), float(component.sum()) / rect_area


def rectangularity(mask: np.ndarray) -> float:
    """Mask area / area of the minimum-area rotated rectangle around all its pixels (1 = a perfect rectangle)."""
    if not mask.any():
        return 0.0
    return min(_min_area_rect(mask)[1], 1.0)

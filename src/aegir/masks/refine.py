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


def grow_from_point(
    lab: np.ndarray,
    x: float,
    y: float,
    radius_px: int = 4,
    sigma: float = 3.0,
    min_std: float = 3.0,
    close_px: int = 5,
    max_px: int = 192,
    open_px: int = 0,
) -> np.ndarray:
    """(H, W) bool: the object under a point prompt, by colour similarity (a prompt-extent estimate, not a mask).

    ``lab``: (H, W, 3) float CIELAB image; (x, y): the point in pixel coordinates (x = col). The colour model is the
    mean / covariance of a ``radius_px`` disk around the point (each axis at least ``min_std``); pixels within
    ``sigma`` Mahalanobis distance of it, closed with a ``close_px`` square (bridges module grid lines), holes
    filled, opened with an ``open_px`` square (cuts thin bridges to look-alike neighbours) and the connected
    component under the point kept; the search is limited to a ``max_px`` square.
    """
    height, width = lab.shape[:2]
    col, row = min(int(x), width - 1), min(int(y), height - 1)
    half = max_px // 2
    r0, c0 = max(row - half, 0), max(col - half, 0)
    window = lab[r0:min(row + half, height), c0:min(col + half, width)]
    rr, cc = np.ogrid[:window.shape[0], :window.shape[1]]
    disk = (rr - (row - r0)) ** 2 + (cc - (col - c0)) ** 2 <= radius_px ** 2
    colours = window[disk].reshape(-1, 3).astype(np.float64)
    cov = np.cov(colours, rowvar=False) if len(colours) > 3 else np.zeros((3, 3))
    cov = cov + np.eye(3) * min_std ** 2
    diff = window.reshape(-1, 3) - colours.mean(axis=0)
    mahal = np.einsum("ij,jk,ik->i", diff, np.linalg.inv(cov), diff).reshape(window.shape[:2])
    similar = (mahal <= sigma ** 2) | disk
    if close_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (close_px, close_px))
        similar = cv2.morphologyEx(similar.astype(np.uint8), cv2.MORPH_CLOSE, kernel).astype(bool)
    similar = ndi.binary_fill_holes(similar)
    if open_px > 1:
        kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (open_px, open_px))
        opened = cv2.morphologyEx(similar.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
        if opened[row - r0, col - c0]:
            similar = opened
    labels, _ = ndi.label(similar)
    out = np.zeros((height, width), bool)
    out[r0:r0 + window.shape[0], c0:c0 + window.shape[1]] = labels == labels[row - r0, col - c0]
    return out


def keep_touching(mask: np.ndarray, anchor: np.ndarray) -> np.ndarray:
    """The 8-connected components of a (h, w) bool mask that overlap the (h, w) bool ``anchor``."""
    labels, n = ndi.label(mask, structure=np.ones((3, 3)))
    if n == 0:
        return mask.astype(bool)
    keep = np.zeros(n + 1, bool)
    keep[np.unique(labels[anchor & mask])] = True
    keep[0] = False
    return keep[labels]

"""Pseudo-labels that earn their place: the flywheel's gate from one target image's model probabilities to the
windows that may train the next model.

DAG (Hamilton; inputs ``image`` (3, H, W) uint8 RGB, ``view_probabilities`` (V, H, W) float32 — the model's PV
probability under V test-time views mapped back to the image grid —, ``mask_factory`` (a Mask Factory backend),
``gate`` (:class:`PseudoLabelGate`), ``window_px``):

    mean_probability ─► candidate_labels ─► candidate_evidence ─► candidate_decisions ─► pseudo_windows
    view_probabilities ─┘       image ─────┘   mask_factory ──┘

Evidence per candidate (an 8-connected component of mean probability ≥ ``gate.threshold``), all independent of
the truth the loop is scored on:

* ``score`` — mean probability over the component (the model's confidence);
* ``tta_agreement`` — IoU, inside the component's box, of the views' intersection and union (does the model say
  the same thing when the image is flipped / turned?);
* ``mask_factory_iou`` — IoU of the component and the Mask Factory's mask drawn from the component's box (does a
  model-free segmenter find the same object there?);
* ``excess_green`` — mean 2g − r − b in chromatic coordinates (vegetation scores high; PV, roofs and asphalt low);
* ``area_px`` and ``rectangularity`` (area / its minimum rotated rectangle: arrays are rectangular, crowns not).

A window's mask (``window_px``², windows on a grid covering the image) has three values: 1 on accepted components,
0 where every view keeps the probability below ``gate.negative_max_probability`` (the model and its test-time
views all call it empty), ``MASK_IGNORE`` elsewhere (rejected candidates and the uncertain band around every
candidate: never trained on). A window is a **positive** pseudo-label when it holds an accepted component, a
**negative** when it holds none and at most ``gate.negative_max_ignore_share`` of it is ignored; anything else
is left out. Pixel coordinates throughout: (row, col), window origins (col, row) top-left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from aegir.masks.prompts import pixel_prompts
from aegir.store.lance_io import MASK_IGNORE


@dataclass(frozen=True)
class PseudoLabelGate:
    """Thresholds of the gate (the flywheel config's ``[flywheel.gate]`` table; see the module docstring)."""

    threshold: float = 0.5
    min_score: float = 0.6
    min_tta_agreement: float = 0.6
    min_mask_factory_iou: float = 0.5
    max_excess_green: float = 0.05
    min_area_px: int = 40
    min_rectangularity: float = 0.5
    negative_max_probability: float = 0.2
    negative_max_ignore_share: float = 0.02
    box_margin_px: int = 3  # the Mask Factory's box prompt: the component's box grown by this much


EVIDENCE = ("score", "tta_agreement", "mask_factory_iou", "excess_green", "area_px", "rectangularity")


def mean_probability(view_probabilities: np.ndarray) -> np.ndarray:
    """(H, W) float32 mean PV probability over the (V, H, W) test-time views."""
    return view_probabilities.mean(axis=0).astype(np.float32)


def candidate_labels(mean_probability: np.ndarray, gate: PseudoLabelGate) -> np.ndarray:
    """(H, W) int32 labels 1..N of the 8-connected components of ``mean_probability ≥ gate.threshold`` with at
    least ``gate.min_area_px`` pixels (0: none; smaller specks are no candidates)."""
    labels, count = ndi.label(mean_probability >= gate.threshold, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= gate.min_area_px
    keep[0] = False
    relabel = np.zeros(count + 1, np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    return relabel[labels]


def _rectangularity(mask: np.ndarray) -> float:
    import cv2

    points = np.argwhere(mask)[:, ::-1].astype(np.float32)
    if len(points) < 3:
        return 0.0
    (_, _), (w, h), _ = cv2.minAreaRect(points)
    return float(min(1.0, mask.sum() / max((w + 1) * (h + 1), 1.0)))


def _excess_green(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 excess-green index 2g − r − b of chromatic coordinates (r = R / (R + G + B), …) of a
    (3, H, W) RGB image: about 0 for grey surfaces, > 0.05 for vegetation."""
    rgb = image[:3].astype(np.float32)
    total = rgb.sum(axis=0) + 1e-6
    r, g, b = rgb / total
    return 2 * g - r - b


def _box(sl: tuple[slice, slice], margin: int, height: int, width: int) -> list[float]:
    rows, cols = sl
    return [max(0, cols.start - margin), max(0, rows.start - margin), min(width, cols.stop + margin),
            min(height, rows.stop + margin)]


def candidate_evidence(candidate_labels: np.ndarray, view_probabilities: np.ndarray, mean_probability: np.ndarray,
                       image: np.ndarray, mask_factory: Any, gate: PseudoLabelGate) -> dict[str, np.ndarray]:
    """Evidence per candidate component (arrays (N,), component k + 1 at index k; see the module docstring) and
    ``box`` (N, 4) pixel boxes (xmin, ymin, xmax, ymax). The Mask Factory draws a mask from the box of every
    candidate that passes the cheap gates (score, area, excess green, TTA, shape), all in one pass."""
    slices = ndi.find_objects(candidate_labels)
    n = len(slices)
    out = {name: np.zeros(n, np.float64) for name in EVIDENCE}
    out["mask_factory_iou"][:] = np.nan
    height, width = candidate_labels.shape
    boxes = np.zeros((n, 4), np.float64)
    green = _excess_green(image)
    views = view_probabilities >= gate.threshold
    for k, sl in enumerate(slices):
        component = candidate_labels[sl] == k + 1
        both, either = views[(slice(None), *sl)].all(axis=0), views[(slice(None), *sl)].any(axis=0)
        out["score"][k] = float(mean_probability[sl][component].mean())
        out["tta_agreement"][k] = float(both.sum() / max(either.sum(), 1))
        out["excess_green"][k] = float(green[sl][component].mean())
        out["area_px"][k] = float(component.sum())
        out["rectangularity"][k] = _rectangularity(component)
        boxes[k] = _box(sl, gate.box_margin_px, height, width)
    asked = np.flatnonzero(_passes_cheap_gates(out, gate))
    if len(asked):
        drawn = _mask_factory_masks(boxes[asked], np.moveaxis(image[:3], 0, -1), mask_factory)
        for k, mask in zip(asked, drawn):
            component = candidate_labels == k + 1
            out["mask_factory_iou"][k] = float((component & mask).sum() / max(int((component | mask).sum()), 1))
    return out | {"box": boxes}


def _mask_factory_masks(boxes: np.ndarray, rgb: np.ndarray, mask_factory: Any, pad: int = 32) -> np.ndarray:
    """(N, H, W) bool: the Mask Factory's masks from (N, 4) boxes (xmin, ymin, xmax, ymax) on an (H, W, 3) image,
    in one pass (the offline backend fits one colour model to all of them) over the crop that holds every box
    plus ``pad`` px."""
    height, width = rgb.shape[:2]
    x0, y0 = (max(0, int(v) - pad) for v in boxes[:, :2].min(axis=0))
    x1, y1 = min(width, int(boxes[:, 2].max()) + pad), min(height, int(boxes[:, 3].max()) + pad)
    prompts = pixel_prompts(y1 - y0, x1 - x0, boxes=boxes - np.array([x0, y0, x0, y0]))
    drawn = mask_factory.segment(np.ascontiguousarray(rgb[y0:y1, x0:x1]), prompts).masks
    out = np.zeros((len(boxes), height, width), bool)
    out[:, y0:y1, x0:x1] = drawn
    return out


def _gate_tests(evidence: dict[str, np.ndarray], gate: PseudoLabelGate) -> list[tuple[str, np.ndarray]]:
    """(gate name, (N,) bool passed) in the order decisions report them; the Mask Factory's comes last (a missing
    opinion fails)."""
    return [("score", evidence["score"] >= gate.min_score),
            ("area", evidence["area_px"] >= gate.min_area_px),
            ("vegetation", evidence["excess_green"] <= gate.max_excess_green),
            ("tta", evidence["tta_agreement"] >= gate.min_tta_agreement),
            ("shape", evidence["rectangularity"] >= gate.min_rectangularity),
            ("mask_factory", np.nan_to_num(evidence["mask_factory_iou"], nan=-1.0) >= gate.min_mask_factory_iou)]


def _passes_cheap_gates(evidence: dict[str, np.ndarray], gate: PseudoLabelGate) -> np.ndarray:
    """(N,) bool: every gate but the Mask Factory's passes (only those candidates are worth its pass)."""
    return np.logical_and.reduce([passed for name, passed in _gate_tests(evidence, gate) if name != "mask_factory"])


def candidate_decisions(candidate_evidence: dict[str, np.ndarray], gate: PseudoLabelGate) -> list[str]:
    """``accept`` or ``reject:<first failed gate>`` per candidate: every gate must pass (a missing Mask Factory
    opinion fails)."""
    tests = _gate_tests(candidate_evidence, gate)
    decisions = []
    for k in range(len(candidate_evidence["score"])):
        failed = next((name for name, passed in tests if not passed[k]), None)
        decisions.append("accept" if failed is None else f"reject:{failed}")
    return decisions


def _window_origins(height: int, width: int, window_px: int) -> list[tuple[int, int]]:
    """(col, row) top-left corners of ``window_px``² windows covering an (H, W) image, the last ones flush with
    its edges (one window per axis when the image is no larger than a window)."""
    def starts(length: int) -> list[int]:
        if length <= window_px:
            return [0]
        count = int(np.ceil(length / window_px))
        return sorted({int(round(i * (length - window_px) / (count - 1))) for i in range(count)})

    return [(c, r) for r in starts(height) for c in starts(width)]


@dataclass(frozen=True)
class PseudoWindow:
    """One admitted window: top-left (``col``, ``row``), ``size`` px, ``kind`` positive | negative, ``mask`` (size,
    size) uint8 0 / 1 / ``MASK_IGNORE``, ``confidence`` (mean score of its accepted components; 1 − max probability for negatives)."""

    col: int
    row: int
    size: int
    kind: str
    mask: np.ndarray
    confidence: float
    components: int


def pseudo_windows(candidate_labels: np.ndarray, candidate_decisions: list[str],
                   candidate_evidence: dict[str, np.ndarray], view_probabilities: np.ndarray,
                   window_px: int, gate: PseudoLabelGate) -> list[PseudoWindow]:
    """The windows this image may contribute (see the module docstring), positives then negatives."""
    height, width = candidate_labels.shape
    size = min(window_px, height, width)
    accepted_ids = [k + 1 for k, d in enumerate(candidate_decisions) if d == "accept"]
    accepted = np.isin(candidate_labels, accepted_ids)
    peak = view_probabilities.max(axis=0)
    labels = np.full((height, width), MASK_IGNORE, np.uint8)
    labels[peak < gate.negative_max_probability] = 0
    labels[accepted] = 1
    out: list[PseudoWindow] = []
    for col, row in _window_origins(height, width, size):
        sl = (slice(row, row + size), slice(col, col + size))
        window = labels[sl]
        if accepted[sl].any():
            ids = np.unique(candidate_labels[sl][accepted[sl]])
            confidence = float(np.mean(candidate_evidence["score"][ids - 1]))
            out.append(PseudoWindow(col, row, size, "positive", window.copy(), confidence, len(ids)))
        elif (window == MASK_IGNORE).mean() <= gate.negative_max_ignore_share:
            out.append(PseudoWindow(col, row, size, "negative", window.copy(), float(1 - peak[sl].max()), 0))
    return out

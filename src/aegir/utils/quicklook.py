"""Pictures a person looks at: chip | mask overlay panels and the flywheel's per-round summary plot (pure: they
return arrays / figures; writing the PNG is the caller's)."""

from __future__ import annotations

import numpy as np

MASK_COLOUR = np.array([255, 0, 255], dtype=np.float32)  # magenta: PV
PROMPT_COLOUR = np.array([255, 255, 0], dtype=np.uint8)  # yellow: prompt outline


def mask_overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` (H, W, 3) uint8 with PV pixels (``mask`` > 0, (H, W)) tinted magenta."""
    out = rgb.astype(np.float32)
    where = mask > 0
    out[where] = (1 - alpha) * out[where] + alpha * MASK_COLOUR
    return out.astype(np.uint8)


def outline(rgb: np.ndarray, region: np.ndarray, colour: np.ndarray = PROMPT_COLOUR) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` with the 1-pixel boundary of the bool (H, W) ``region`` drawn in ``colour``."""
    from scipy import ndimage as ndi

    edge = region & ~ndi.binary_erosion(region, border_value=0)
    out = rgb.copy()
    out[edge] = colour
    return out


def chip_panel(rgb: np.ndarray, mask: np.ndarray | None = None, prompt: np.ndarray | None = None) -> np.ndarray:
    """(H, 2W + 4, 3) uint8 side by side: the chip (prompt outlined when given) | the mask overlay (the chip
    again when there is no mask). ``rgb`` (H, W, 3) uint8, ``mask`` (H, W), ``prompt`` (H, W) bool."""
    left = outline(rgb, prompt) if prompt is not None and prompt.any() else rgb
    right = mask_overlay(rgb, mask) if mask is not None else rgb
    gap = np.full((rgb.shape[0], 4, 3), 255, np.uint8)
    return np.concatenate([left, gap, right], axis=1)


DECISION_COLOURS = {"accept": np.array([0, 220, 0], np.uint8), "reject": np.array([255, 40, 40], np.uint8),
                    "needs_review": np.array([255, 165, 0], np.uint8)}


def decision_outlines(rgb: np.ndarray, regions: dict[str, np.ndarray], width: int = 2) -> np.ndarray:
    """(H, W, 3) uint8: ``rgb`` with each decision's detections outlined in its colour (accept green, reject red,
    needs_review orange). ``regions`` maps a decision to a (H, W) bool mask of its detections."""
    from scipy import ndimage as ndi

    out = rgb.copy()
    for decision, region in regions.items():
        if region is None or not region.any():
            continue
        edge = region & ~ndi.binary_erosion(region, iterations=width, border_value=0)
        out[edge] = DECISION_COLOURS.get(decision, PROMPT_COLOUR)
    return out


def flywheel_summary_figure(table: list[dict]):
    """A matplotlib Figure of the per-round table: quality per round (seed-test and target pixel IoU, target object
    F1, transfer box F1) and the pseudo-label windows trained on (positive / negative) as stacked bars."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    rounds = [row["round"] for row in table]
    figure = Figure(figsize=(9, 3.6), dpi=100)
    scores, counts = figure.subplots(1, 2)
    for key, label in (("seed_test_iou", "seed-test pixel IoU"), ("target_iou", "target pixel IoU"),
                       ("target_object_f1", "target object F1 @ IoU 0.5"), ("transfer_f1", "transfer box F1")):
        values = [np.nan if row.get(key) is None else row[key] for row in table]
        scores.plot(rounds, values, marker="o", label=label)
    scores.set(xlabel="round", ylim=(0, 1), xticks=rounds, title="quality (truth the loop never reads)")
    scores.legend(fontsize=8)
    bottom = np.zeros(len(table))
    for key, colour in (("pseudo_positive", "tab:green"), ("pseudo_negative", "tab:grey")):
        values = np.array([row.get(key) or 0 for row in table], dtype=float)
        counts.bar(rounds, values, bottom=bottom, color=colour, label=key.replace("_", " "))
        bottom += values
    counts.set(xlabel="round", ylabel="windows", xticks=rounds, title="pseudo-labels trained on")
    counts.legend(fontsize=8)
    figure.tight_layout()
    return figure

"""Connected components of binary masks (pure numpy / scipy; used by the store and the Mask Factory alike)."""

from __future__ import annotations

import numpy as np


def mask_component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(xmin, ymin, xmax, ymax) pixel-corner boxes of the 8-connected components of an (H, W) mask (PV > 0):
    the box prompts a person would draw around each ground-truth array."""
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask > 0, structure=np.ones((3, 3)))
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndi.find_objects(labels)]

"""Connected components of binary masks (pure numpy / scipy; used by the store and the Mask Factory alike).

One PV "array" is one 8-connected component of ``mask > 0``; every benchmark and label set counts arrays this way.
"""

from __future__ import annotations

import numpy as np


def mask_component_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """(labels (H, W) int32, 0 = background, components 1..n in raster-scan order; n) of the 8-connected
    components of an (H, W) mask (PV > 0)."""
    from scipy import ndimage as ndi

    labels, count = ndi.label(np.asarray(mask) > 0, structure=np.ones((3, 3)))
    return labels.astype(np.int32, copy=False), int(count)


def mask_component_boxes(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """(xmin, ymin, xmax, ymax) pixel-corner boxes of the 8-connected components of an (H, W) mask (PV > 0):
    the box prompts a person would draw around each ground-truth array (the k-th box is component k + 1 of
    :func:`mask_component_labels`)."""
    from scipy import ndimage as ndi

    labels, _ = mask_component_labels(mask)
    return [(s[1].start, s[0].start, s[1].stop, s[0].stop) for s in ndi.find_objects(labels)]

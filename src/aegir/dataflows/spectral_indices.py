"""Hamilton dataflow: spectral indices from reflectance bands (Sentinel-2 or any sensor with the same bands).

Every public function is a DAG node named for the index it returns; its parameters are band nodes/inputs named
``blue``, ``green``, ``red``, ``nir``, ``swir1``, ``swir2``: reflectance arrays (unitless, 0–1; DN ×10000 also
works for the ratio indices, which are scale-free) of any one shape, e.g. (H, W) or (T, H, W). Sentinel-2:
blue B02 (490 nm), green B03 (560 nm), red B04 (665 nm), nir B08 (842 nm), swir1 B11 (1610 nm),
swir2 B12 (2190 nm). Outputs are float32 of the same shape, NaN wherever an input is NaN/inf (nodata) or the
denominator is 0. Computation is float64, vectorised numpy.

:func:`indices_for_chip` computes named indices from a :class:`~aegir.utils.types.Chip`, finding bands by
Sentinel-2 name (``B02`` …) or common name (``blue`` …).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from aegir.utils.types import Chip

BAND_ALIASES: dict[str, tuple[str, ...]] = {
    "blue": ("B02", "blue"),
    "green": ("B03", "green"),
    "red": ("B04", "red"),
    "nir": ("B08", "nir", "B8A", "nir08"),
    "swir1": ("B11", "swir1", "swir16"),
    "swir2": ("B12", "swir2", "swir22"),
}


def _as_float(*bands: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(b, dtype=np.float64) for b in bands]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"band arrays must share one shape, got {sorted(shapes)}")
    return arrays


def _ratio(numerator: np.ndarray, denominator: np.ndarray, *inputs: np.ndarray) -> np.ndarray:
    """numerator / denominator as float32; NaN where any input is not finite or the denominator is 0."""
    ok = np.isfinite(denominator) & (denominator != 0)
    for band in inputs:
        ok &= np.isfinite(band)
    out = np.full(np.shape(denominator), np.nan, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=ok)
    return out.astype(np.float32)


def _normalized_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _as_float(a, b)
    return _ratio(a - b, a + b, a, b)


def ndvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """NDVI = (NIR − Red) / (NIR + Red), −1…1; dense green vegetation ≳ 0.5.

    Rouse, Haas, Schell & Deering (1974), Monitoring vegetation systems in the Great Plains with ERTS, Third ERTS
    Symposium, NASA SP-351, 309–317.
    """
    return _normalized_difference(nir, red)


def ndwi(green: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDWI (McFeeters) = (Green − NIR) / (Green + NIR), −1…1; open water > 0.

    McFeeters (1996), The use of the Normalized Difference Water Index (NDWI) in the delineation of open water
    features, International Journal of Remote Sensing 17(7), 1425–1432, doi:10.1080/01431169608948714.
    """
    return _normalized_difference(green, nir)


def mndwi(green: np.ndarray, swir1: np.ndarray) -> np.ndarray:
    """MNDWI = (Green − SWIR1) / (Green + SWIR1), −1…1; open water > 0, suppresses built-up noise of NDWI.

    Xu (2006), Modification of normalised difference water index (NDWI) to enhance open water features in
    remotely sensed imagery, International Journal of Remote Sensing 27(14), 3025–3033,
    doi:10.1080/01431160600589179.
    """
    return _normalized_difference(green, swir1)


def ndbi(swir1: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDBI = (SWIR1 − NIR) / (SWIR1 + NIR), −1…1; built-up/bare land > 0.

    Zha, Gao & Ni (2003), Use of normalized difference built-up index in automatically mapping urban areas from
    TM imagery, International Journal of Remote Sensing 24(3), 583–594, doi:10.1080/01431160304987.
    """
    return _normalized_difference(swir1, nir)


def nbr(nir: np.ndarray, swir2: np.ndarray) -> np.ndarray:
    """NBR = (NIR − SWIR2) / (NIR + SWIR2), −1…1; low/negative on burnt, bare or dark surfaces.

    Key & Benson (2006), Landscape Assessment: Ground measure of severity, the Composite Burn Index; and Remote
    sensing of severity, the Normalized Burn Ratio, USDA Forest Service RMRS-GTR-164-CD, LA 1–51.
    """
    return _normalized_difference(nir, swir2)


def bsi(blue: np.ndarray, red: np.ndarray, nir: np.ndarray, swir1: np.ndarray) -> np.ndarray:
    """BSI = ((SWIR1 + Red) − (NIR + Blue)) / ((SWIR1 + Red) + (NIR + Blue)), −1…1; bare soil > 0.

    Rikimaru, Roy & Miyatake (2002), Tropical forest cover density mapping, Tropical Ecology 43(1), 39–47.
    """
    blue, red, nir, swir1 = _as_float(blue, red, nir, swir1)
    soil, veg = swir1 + red, nir + blue
    return _ratio(soil - veg, soil + veg, blue, red, nir, swir1)


def ndpvi(blue: np.ndarray, nir: np.ndarray) -> np.ndarray:
    """NDPVI (Normalized Difference Photovoltaic Index) = (0.5·Blue − NIR) / (0.5·Blue + NIR), −1…1.

    PV glass/cells reflect relatively more blue and much less NIR than vegetation, soil or roofs, so PV arrays
    score high (towards 0 and above) where vegetation scores near −1. Used, with NBD, as a PV feature in the
    GM-SEUS dataset: Stid, J. T. et al. (2025), A harmonized dataset of ground-mounted solar energy in the US with
    enhanced metadata, Scientific Data, doi:10.1038/s41597-025-05862-4 (panel-row classification on NAIP
    blue/green/red/NIR imagery). **Formula source:** confirmed from the authors' published code (GitHub
    stidjaco/GMSEUS, Earth Engine utilities: ``(0.5*B-N)/(0.5*B+N)``), not from the typeset paper, which could
    not be read here; the index's first publication (possibly Stid et al. 2022, the California Central Valley PV
    dataset) could not be confirmed.
    """
    blue, nir = _as_float(blue, nir)
    return _ratio(0.5 * blue - nir, 0.5 * blue + nir, blue, nir)


def nbd(blue: np.ndarray, green: np.ndarray, red: np.ndarray) -> np.ndarray:
    """NBD (Normalized Blue Deviation) = (Blue − (Red + Green)/2) / (Blue + (Red + Green)/2), −1…1.

    Blue excess over the visible mean: PV panels (blue/dark glass) > most land covers. Same source and caveat as
    :func:`ndpvi`: GM-SEUS, Stid, J. T. et al. (2025), Scientific Data, doi:10.1038/s41597-025-05862-4; formula
    confirmed from the authors' code (``(B-((R+G)/2))/(B+((R+G)/2))``), not from the typeset paper.
    """
    blue, green, red = _as_float(blue, green, red)
    visible = (red + green) / 2.0
    return _ratio(blue - visible, blue + visible, blue, green, red)


_INDICES: dict[str, Callable[..., np.ndarray]] = {
    "ndvi": ndvi, "ndwi": ndwi, "mndwi": mndwi, "ndbi": ndbi, "nbr": nbr, "bsi": bsi, "ndpvi": ndpvi, "nbd": nbd,
}
INDEX_NAMES: tuple[str, ...] = tuple(_INDICES)


def _chip_band(chip: Chip, role: str) -> np.ndarray:
    lowered = {b.lower(): i for i, b in enumerate(chip.bands)}
    for alias in BAND_ALIASES[role]:
        if alias.lower() in lowered:
            return chip.pixels[lowered[alias.lower()]]
    raise KeyError(f"{chip.source}: no {role} band (looked for {BAND_ALIASES[role]}) among {chip.bands}")


def indices_for_chip(chip: Chip, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Index name (any of ``INDEX_NAMES``, case-insensitive) → (H, W) float32 computed from ``chip``'s bands;
    NaN where the chip is not valid, a band is NaN, or the denominator is 0."""
    out: dict[str, np.ndarray] = {}
    for name in names:
        key = name.lower()
        if key not in _INDICES:
            raise KeyError(f"unknown index {name!r}; known: {', '.join(INDEX_NAMES)}")
        function = _INDICES[key]
        roles = function.__code__.co_varnames[: function.__code__.co_argcount]
        values = function(**{role: _chip_band(chip, role) for role in roles})
        if chip.valid is not None:
            values = np.where(chip.valid, values, np.float32(np.nan)).astype(np.float32)
        out[key] = values
    return out

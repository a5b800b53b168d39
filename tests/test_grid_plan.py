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
    assert len(tokens) == len(set(tokens)) == len(grid_plan.plan_cells(BOSTON, 14))
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
    cells = [s2cell.lat_lon_to_token(42.35, -71.05, 14)]
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
        grid_plan.plan_cells(shapely.Polygon(), 13)

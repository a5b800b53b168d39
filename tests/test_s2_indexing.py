"""S2/H3 indexing: vectorised tokens equal s2cell's, cell polygons, coverings of real PV polygons, Hamilton DAG."""

from __future__ import annotations

from pathlib import Path

import h3
import numpy as np
import pyogrio
import pytest
import s2cell
import shapely

from aegir.dataflows import s2_indexing
from aegir.utils import s2geometry as s2

LEVELS = (0, 1, 5, 10, 13, 17, 24, 30)
PV_FILE = Path("labels") / "osm_pv_germany_austria" / "photovoltaic.shp"


def _reference_tokens(lat: np.ndarray, lon: np.ndarray, level: int) -> list[str]:
    return [s2cell.lat_lon_to_token(a, b, level) for a, b in zip(lat.tolist(), lon.tolist())]


def _hard_points() -> tuple[np.ndarray, np.ndarray]:
    """Poles, ±180, face boundaries (lon ±45/±135, lat ±35.26 on the face diagonals), equator, cube corners."""
    corner = np.degrees(np.arctan(1 / np.sqrt(2)))
    lats = np.array([90.0, -90.0, 0.0, -0.0, 45.0, -45.0, corner, -corner, 89.999999, -89.999999, 1e-12, 35.0])
    lons = np.array([180.0, -180.0, 0.0, 45.0, -45.0, 135.0, -135.0, 90.0, -90.0, 179.9999999, -179.9999999, 1e-12])
    lat, lon = np.meshgrid(lats, lons)
    return lat.ravel(), lon.ravel()


def _random_points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))  # uniform on the sphere
    return lat, rng.uniform(-180.0, 180.0, n)


@pytest.fixture(scope="module")
def pv_frame(shared_data: Path):
    frame = pyogrio.read_dataframe(shared_data / PV_FILE)
    assert frame.crs.to_epsg() == 4326 and len(frame) > 1000
    return frame


@pytest.mark.parametrize("level", LEVELS)
def test_tokens_equal_s2cell_random_and_boundary_points(level: int) -> None:
    lat, lon = _random_points(3000, seed=level)
    hard_lat, hard_lon = _hard_points()
    lat, lon = np.r_[lat, hard_lat], np.r_[lon, hard_lon]
    tokens = s2.s2_tokens(lat, lon, level)
    assert tokens.dtype == object and tokens.shape == lat.shape
    assert tokens.tolist() == _reference_tokens(lat, lon, level)
    ids = s2.s2_cell_ids(lat, lon, level)
    assert ids.dtype == np.uint64
    assert ids.tolist() == [s2cell.lat_lon_to_cell_id(a, b, level) for a, b in zip(lat.tolist(), lon.tolist())]
    assert (s2.cell_level(ids) == level).all()


def test_tokens_stay_exact_when_numpy_trig_is_off_by_an_ulp(monkeypatch: pytest.MonkeyPatch) -> None:
    exact = s2._xyz_numpy
    monkeypatch.setattr(s2, "_xyz_numpy", lambda lat, lon: np.nextafter(exact(lat, lon), np.inf))
    lat, lon = _random_points(20000, seed=99)
    hard_lat, hard_lon = _hard_points()
    lat, lon = np.r_[lat, hard_lat], np.r_[lon, hard_lon]
    for level in (1, 17, 30):
        assert s2.s2_tokens(lat, lon, level).tolist() == _reference_tokens(lat, lon, level)


def test_tokens_equal_s2cell_for_real_pv_centroids(pv_frame) -> None:
    points = pv_frame.geometry.representative_point()
    lat, lon = points.y.to_numpy(), points.x.to_numpy()
    for level in (10, 13, 17, 24, 30):
        assert s2.s2_tokens(lat, lon, level).tolist() == _reference_tokens(lat, lon, level)


def test_token_id_round_trip_and_zero_token() -> None:
    lat, lon = _random_points(500, seed=7)
    ids = s2.s2_cell_ids(lat, lon, 30)
    tokens = s2.cell_id_to_token(ids)
    assert tokens.tolist() == [s2cell.cell_id_to_token(int(i)) for i in ids]
    assert (s2.token_to_cell_id(tokens) == ids).all()
    assert (s2.token_to_cell_id(np.strings.upper(tokens.astype(str))) == ids).all()
    assert s2.cell_id_to_token(np.array([0], dtype=np.uint64)).tolist() == ["X"]
    assert s2.token_to_cell_id(["X", "x", "1"]).tolist() == [0, 0, 1 << 60]
    some = ["1", "1c", "47a1", "47a104", tokens[0]]
    assert s2.cell_level(s2.token_to_cell_id(some)).tolist() == [s2cell.token_to_level(t) for t in some]


def test_h3_cells_equal_h3() -> None:
    lat, lon = _random_points(200, seed=3)
    expected = [h3.latlng_to_cell(a, b, 9) for a, b in zip(lat.tolist(), lon.tolist())]
    assert s2.h3_cells(lat, lon, 9).tolist() == expected


def test_cell_polygon_contains_its_points_and_tiles_the_sphere() -> None:
    lat, lon = _random_points(300, seed=11)
    for la, lo, token in zip(lat, lon, s2.s2_tokens(lat, lon, 12)):
        assert s2.s2_cell_polygon(token).intersects(shapely.Point(lo, la))
    level2 = s2.cell_id_to_token(s2.s2_cell_ids(*np.meshgrid(np.linspace(-89, 89, 90), np.linspace(-179, 179, 180)), 2))
    polygons = [s2.s2_cell_polygon(t, edge_points=8) for t in np.unique(level2)]
    assert len(polygons) == 96
    assert sum(p.area for p in polygons) == pytest.approx(360.0 * 180.0)
    assert shapely.union_all(polygons).area == pytest.approx(360.0 * 180.0)


def test_cell_polygon_at_antimeridian_and_pole() -> None:
    crossing = s2.s2_cell_polygon("7")  # face 3, centred on lon 180; at levels >= 1 ±180 is always a cell edge
    assert crossing.geom_type == "MultiPolygon" and crossing.area == pytest.approx(s2.s2_cell_polygon("1").area)
    west = s2.s2_cell_polygon(s2cell.lat_lon_to_token(10.0, -179.99, 10))
    east = s2.s2_cell_polygon(s2cell.lat_lon_to_token(10.0, 179.99, 10))
    assert west.geom_type == east.geom_type == "Polygon" and west.bounds[0] == -180.0 and east.bounds[2] == 180.0
    polar = s2.s2_cell_polygon(s2cell.lat_lon_to_token(89.99, 10.0, 6))
    assert polar.is_valid and polar.bounds[3] == 90.0
    assert len(shapely.get_coordinates(s2.s2_cell_polygon("47a1", edge_points=1))) == 5


def test_covering_of_real_pv_polygon_level_17(pv_frame) -> None:
    geometries = pv_frame.geometry.to_numpy()
    geometries = geometries[shapely.within(shapely.centroid(geometries), geometries)]
    geometry = geometries[int(np.argmax(shapely.area(geometries)))]  # the largest, for several cells
    tokens = s2.s2_covering(geometry, 17)
    assert tokens == sorted(set(tokens)) and len(tokens) > 1
    vertices = shapely.get_coordinates(geometry)
    assert set(s2.s2_tokens(vertices[:, 1], vertices[:, 0], 17)) <= set(tokens)
    centroid = geometry.centroid
    assert s2cell.lat_lon_to_token(centroid.y, centroid.x, 17) in tokens
    cells = np.array([s2.s2_cell_polygon(t) for t in tokens])
    assert shapely.intersects(cells, geometry).all()
    assert geometry.difference(shapely.union_all(cells)).area == pytest.approx(0.0, abs=1e-15)


def test_covering_matches_brute_force_enumeration(pv_frame) -> None:
    geometry = pv_frame.geometry.iloc[0].buffer(0.02)
    x0, y0, x1, y1 = geometry.bounds
    lon, lat = np.meshgrid(np.linspace(x0 - 0.2, x1 + 0.2, 400), np.linspace(y0 - 0.2, y1 + 0.2, 400))
    candidates = np.unique(s2.s2_tokens(lat, lon, 11))
    cells = np.array([s2.s2_cell_polygon(t) for t in candidates])
    assert s2.s2_covering(geometry, 11) == sorted(candidates[shapely.intersects(cells, geometry)].tolist())


def test_covering_of_point_line_and_antimeridian_box() -> None:
    assert s2.s2_covering(shapely.Point(11.5, 48.1), 17) == [s2cell.lat_lon_to_token(48.1, 11.5, 17)]
    line = s2.s2_covering(shapely.LineString([(11.0, 48.0), (11.01, 48.01)]), 17)
    assert s2cell.lat_lon_to_token(48.0, 11.0, 17) in line and s2cell.lat_lon_to_token(48.01, 11.01, 17) in line
    assert len(s2.s2_covering(shapely.box(-180, -90, 180, 90), 2)) == 96
    east = s2.s2_covering(shapely.box(179.0, -1.0, 180.0, 1.0), 8)
    assert s2cell.lat_lon_to_token(0.5, 179.5, 8) in east
    assert s2.s2_covering(shapely.Polygon(), 10) == []


def test_covering_too_many_cells_raises() -> None:
    with pytest.raises(ValueError, match=r"level 20.*max_cells=1000"):
        s2.s2_covering(shapely.box(11.0, 48.0, 11.1, 48.1), 20, max_cells=1000)


@pytest.mark.parametrize(
    ("lat", "lon", "level", "message"),
    [
        ([0.0, 91.0, -95.0], [0.0, 0.0, 0.0], 10, r"2 of 3 latitudes are outside \[-90, 90\]"),
        ([0.0, np.nan], [0.0, 0.0], 10, r"1 of 2 coordinates are NaN"),
        ([0.0], [np.inf], 10, r"1 of 1 coordinates are NaN or infinite"),
        ([0.0], [0.0], 31, r"S2 level must be an integer in 0\.\.30, got 31"),
        ([0.0], [0.0], -1, r"S2 level must be an integer in 0\.\.30"),
        ([0.0], [0.0], 1.5, r"S2 level must be an integer"),
    ],
)
def test_invalid_inputs_raise(lat, lon, level, message) -> None:
    with pytest.raises(ValueError, match=message):
        s2.s2_tokens(np.array(lat), np.array(lon), level)


def test_invalid_tokens_ids_and_resolutions_raise() -> None:
    with pytest.raises(ValueError, match="not valid S2 cell ids"):
        s2.cell_level(np.array([0, 1 << 60], dtype=np.uint64))
    with pytest.raises(ValueError, match="non-hex"):
        s2.token_to_cell_id(["47a1", "zz"])
    with pytest.raises(ValueError, match="longer than 16"):
        s2.token_to_cell_id(["1" * 17])
    with pytest.raises(ValueError, match="not valid S2 cell ids"):
        s2.s2_cell_polygon("4")
    with pytest.raises(ValueError, match="H3 resolution"):
        s2.h3_cells([0.0], [0.0], 16)
    with pytest.raises(ValueError, match="S2 level"):
        s2.s2_covering(shapely.Point(0, 0), 31)


def test_hamilton_dataflow_builds_and_executes() -> None:
    from hamilton import driver

    dr = driver.Builder().with_modules(s2_indexing).build()
    lat, lon = np.array([48.1, 52.5, -33.9]), np.array([11.5, 13.4, 151.2])
    result = dr.execute(
        ["s2_tokens_by_level", "h3_cell_ids", "aoi_s2_covering"],
        inputs={
            "centroid_lat": lat, "centroid_lon": lon, "s2_levels": (10, 13), "h3_resolution": 9,
            "aoi_geometry": shapely.box(11.0, 48.0, 11.01, 48.01), "covering_level": 14,
        },
    )
    assert set(result["s2_tokens_by_level"]) == {10, 13}
    assert result["s2_tokens_by_level"][13].tolist() == _reference_tokens(lat, lon, 13)
    assert result["h3_cell_ids"].tolist() == [h3.latlng_to_cell(a, b, 9) for a, b in zip(lat, lon)]
    assert result["aoi_s2_covering"] == s2.s2_covering(shapely.box(11.0, 48.0, 11.01, 48.01), 14)


def test_training_samples_take_levels_and_resolution_as_inputs() -> None:
    from aegir.dataflows import training_sample_builder as builder

    centroids = np.array([[11.5, 48.1], [151.2, -33.9]])  # lon, lat
    lat, lon = centroids[:, 1], centroids[:, 0]
    default = builder.sample_s2_tokens(centroids)
    assert sorted(default) == [10, 13, 17] and default[13].tolist() == _reference_tokens(lat, lon, 13)
    custom = builder.sample_s2_tokens(centroids, (8, 12))
    assert sorted(custom) == [8, 12] and custom[8].tolist() == _reference_tokens(lat, lon, 8)
    assert builder.sample_h3_cells(centroids).tolist() == [h3.latlng_to_cell(a, b, 12) for a, b in zip(lat, lon)]
    assert builder.sample_h3_cells(centroids, 7).tolist() == [h3.latlng_to_cell(a, b, 7) for a, b in zip(lat, lon)]

"""Installations: detection fragments merged across tile / cell borders on real OSM PV polygons, the gap rule,
orientation of known rotated rectangles, the USPVDB capacity relation scored on held-out states, the GeoParquet /
GeoPackage files and the per-plan DuckLake table."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pyogrio
import pytest
import rasterio
import rasterio.features
import shapely
from conftest import JIANG_PV01, LABELS
from pyproj import Geod, Transformer

from aegir.dataflows.capacity_fit import CapacityRelation
from aegir.pipelines import run_stage
from aegir.pipelines.region import plan_installations
from aegir.store import capacity_files, ducklake, region_files
from aegir.utils import geo

OSM_GERMANY = LABELS / "osm_pv_germany_austria" / "germany_photovoltaic.shp"
USPVDB = LABELS / "uspvdb" / "uspvdb_v3_0_20250430.csv"
GEOD = Geod(ellps="WGS84")


def _area_m2(geometry: shapely.Geometry) -> float:
    return abs(GEOD.geometry_area_perimeter(shapely.orient_polygons(geometry))[0])


def _rows(geometries: list, plan_id: str = "plan_a", scores: list[float] | None = None) -> pa.Table:
    """``predicted_pv``-like rows: detection ids d0, d1, …, EPSG:4326 WKB polygons, scores."""
    count = len(geometries)
    return pa.table({"detection_id": [f"d{i}" for i in range(count)], "plan_id": [plan_id] * count,
                     "cell_token": ["c"] * count, "geometry_wkb": shapely.to_wkb(np.array(geometries)).tolist(),
                     "score": scores if scores is not None else [0.8] * count})


@pytest.fixture(scope="module")
def osm_pair() -> tuple[shapely.Geometry, shapely.Geometry]:
    """Two real OSM PV farm polygons (Germany): the one of median geodesic area and a second, > 1 km away."""
    frame = pyogrio.read_dataframe(OSM_GERMANY)
    geometry = frame.geometry.values
    areas = np.array([_area_m2(g) for g in geometry])
    order = np.argsort(areas, kind="stable")
    first = geometry[order[len(order) // 2]]
    far = next(geometry[i] for i in order[len(order) // 2 + 1:] if shapely.distance(first, geometry[i]) > 0.02)
    return first, far


def _split_at_centroid(polygon: shapely.Geometry) -> list[shapely.Geometry]:
    """The polygon cut by the meridian through its centroid (a tile border): its west and east parts."""
    x = polygon.centroid.x
    left, bottom, right, top = polygon.bounds
    return [shapely.intersection(polygon, shapely.box(left - 1, bottom - 1, x, top + 1)),
            shapely.intersection(polygon, shapely.box(x, bottom - 1, right + 1, top + 1))]


def test_fragments_cut_by_a_tile_border_merge_into_one_installation(osm_pair):
    farm, far = osm_pair
    west, east = _split_at_centroid(farm)
    assert _area_m2(west) > 0.1 * _area_m2(farm) and _area_m2(east) > 0.1 * _area_m2(farm)
    rows = _rows([west, far, east], scores=[0.9, 0.7, 0.6])
    result = plan_installations(rows, "plan_a", gap_m=5.0)
    assert result.num_rows == 2
    merged, alone = result.to_pylist()  # in the order of each installation's first detection
    assert merged["detection_ids"] == ["d0", "d2"] and merged["detection_count"] == 2
    assert alone["detection_ids"] == ["d1"] and alone["detection_count"] == 1
    assert merged["area_m2"] == pytest.approx(_area_m2(farm), rel=1e-6)
    assert alone["area_m2"] == pytest.approx(_area_m2(far), rel=1e-9)
    union = shapely.from_wkb(merged["geometry_wkb"])
    assert union.is_valid and shapely.symmetric_difference(union, farm).area < 1e-6 * farm.area
    assert merged["score_max"] == 0.9
    weights = np.array([_area_m2(west), _area_m2(east)])
    assert merged["score_mean"] == pytest.approx(np.average([0.9, 0.6], weights=weights))
    for row in (merged, alone):
        assert 0 <= row["orientation_deg"] < 180 and row["plan_id"] == "plan_a" and row["gap_m"] == 5.0
        assert 0 < row["capacity_kwp_low"] < row["capacity_kwp"] < row["capacity_kwp_high"]
        assert not row["capacity_extrapolated"]  # OSM farms are utility-sized: inside USPVDB's area range
    assert merged["installation_id"] != alone["installation_id"]
    again = plan_installations(_rows([west, far, east]), "plan_a", gap_m=5.0)
    assert again.column("installation_id").to_pylist() == result.column("installation_id").to_pylist()


def _boxes_apart(gaps_m: list[float], lon: float = 11.9, lat: float = 51.3) -> list[shapely.Geometry]:
    """Boxes 40 × 20 m in a row, west to east, separated by ``gaps_m`` metres (built in UTM, EPSG:4326)."""
    to_lonlat = Transformer.from_crs(geo.utm_crs(lon, lat), 4326, always_xy=True)
    x0, y0 = Transformer.from_crs(4326, geo.utm_crs(lon, lat), always_xy=True).transform(lon, lat)
    boxes, x = [], x0
    for gap in [0.0, *gaps_m]:
        x += gap
        boxes.append(shapely.box(x, y0, x + 40, y0 + 20))
        x += 40
    return [shapely.transform(b, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))
            for b in boxes]


@pytest.mark.parametrize(("gap_m", "expected"), [(0.0, [[0], [1], [2]]), (2.0, [[0], [1], [2]]),
                                                 (5.0, [[0, 1], [2]]), (15.0, [[0, 1, 2]])])
def test_detections_closer_than_the_gap_form_one_installation(gap_m, expected):
    rows = _rows(_boxes_apart([3.0, 12.0]))
    result = plan_installations(rows, "p", gap_m=gap_m, capacity_params=capacity_files.read_capacity_params())
    assert result.column("detection_ids").to_pylist() == [[f"d{i}" for i in group] for group in expected]
    # a MultiPolygon: the gaps between members are not filled
    assert [shapely.from_wkb(g).geom_type for g in result.column("geometry_wkb").to_pylist()] == [
        "MultiPolygon" if len(group) > 1 else "Polygon" for group in expected]


def test_touching_fragments_join_at_gap_zero_and_a_bad_gap_is_a_clear_error(osm_pair):
    result = plan_installations(_rows(_split_at_centroid(osm_pair[0])), "p", gap_m=0.0)
    assert result.num_rows == 1
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="gap_m must be a finite distance >= 0"):
            plan_installations(_rows(_split_at_centroid(osm_pair[0])), "p", gap_m=bad)


def _mask_polygons(stem: str, lon: float, overlap_px: int = 0) -> list[shapely.Geometry]:
    """Pixel-staircase polygons of a real Jiang PV01 truth mask (4-connected: diagonal pixels are separate
    polygons that touch at a point), at ~0.3 m pixels near ``lon`` / 30.3° N. With ``overlap_px``, each panel is
    cut by two windows sharing ``overlap_px`` columns, as two cells keep the two truncations of one large
    component: fragments that overlap."""
    with rasterio.open(JIANG_PV01 / "masks" / f"{stem}.bmp") as src:
        mask = (src.read(1) > 0).astype(np.uint8)
    polygons = [shapely.geometry.shape(s) for s, _ in rasterio.features.shapes(mask, mask=mask > 0, connectivity=4)]
    if overlap_px:
        middle = mask.shape[1] / 2
        windows = [shapely.box(-1, -1, middle + overlap_px, mask.shape[0] + 1),
                   shapely.box(middle - overlap_px, -1, mask.shape[1] + 1, mask.shape[0] + 1)]
        polygons = [part for p in polygons for w in windows if not (part := shapely.intersection(p, w)).is_empty]
    to_lonlat = (lambda xy: np.column_stack([lon + 3e-6 * xy[:, 0], 30.3 - 3e-6 * xy[:, 1]]))
    return [shapely.transform(p, to_lonlat) for p in polygons]


def test_installation_geometry_is_the_geos_union_of_real_mask_polygons(monkeypatch):
    """The union shortcut (only overlapping or edge-sharing detections go through GEOS's union; large ones
    last) gives the polygon GEOS's union_all gives, on real staircase polygons that touch at points and overlap."""
    from aegir.dataflows import installations

    monkeypatch.setattr(installations, "_LARGE_POLYGON_VERTICES", 8)  # the large-polygon path on these panels
    touching = _mask_polygons("PV01_325137_1204232", lon=-97.70)
    overlapping = _mask_polygons("PV01_325190_1204161", lon=-97.69, overlap_px=40)
    geometry = np.array(touching + overlapping, dtype=object)
    pairs = installations.member_overlaps(geometry)
    assert 0 < pairs.shape[1] < len(overlapping)  # overlapping fragments, not every pair
    assert shapely.touches(geometry[:len(touching), None], geometry[None, :len(touching)]).any()
    result = plan_installations(_rows(list(geometry)), "p", gap_m=0.5)
    assert 2 <= result.num_rows < len(geometry)
    ids = {f"d{i}": i for i in range(len(geometry))}
    for members, wkb in zip(result.column("detection_ids").to_pylist(), result.column("geometry_wkb").to_pylist(),
                            strict=True):
        union, expected = shapely.from_wkb(wkb), shapely.union_all([geometry[ids[m]] for m in members])
        assert union.is_valid and union.geom_type == expected.geom_type
        assert shapely.symmetric_difference(union, expected).area <= 1e-9 * expected.area


def _rectangle(lon: float, lat: float, azimuth: float, length_m: float, width_m: float) -> shapely.Geometry:
    """A geodesic rectangle (EPSG:4326) centred on lon/lat, long side at ``azimuth`` degrees from true north."""
    ends = [GEOD.fwd(lon, lat, azimuth + turn, length_m / 2)[:2] for turn in (0, 180)]
    corners = [GEOD.fwd(*ends[0], azimuth + 90, width_m / 2)[:2], GEOD.fwd(*ends[0], azimuth - 90, width_m / 2)[:2],
               GEOD.fwd(*ends[1], azimuth - 90, width_m / 2)[:2], GEOD.fwd(*ends[1], azimuth + 90, width_m / 2)[:2]]
    return shapely.Polygon(corners)


@pytest.mark.parametrize("azimuth", [0.5, 30.0, 95.0, 150.0, 179.5])
def test_orientation_is_the_long_edge_from_true_north(azimuth):
    """At 60° N, 2.9° east of UTM zone 32's central meridian, grid north is 2.5° off true north: the local
    projection centred on the installation keeps the orientation on true north."""
    rectangle = _rectangle(11.9, 60.0, azimuth, 120.0, 30.0)
    result = plan_installations(_rows([rectangle]), "p").to_pylist()[0]
    assert result["orientation_deg"] == pytest.approx(azimuth, abs=0.05)
    assert result["area_m2"] == pytest.approx(120.0 * 30.0, rel=1e-3)


@pytest.fixture(scope="module")
def capacity_fit() -> dict:
    rows = capacity_files.read_uspvdb_capacity(USPVDB)
    return run_stage("capacity_fit", ["fitted_capacity_relation", "capacity_fit_scores", "heldout_mask",
                                      "usable_rows"], {"uspvdb_rows": rows, "capacity_source": f"USPVDB {USPVDB.name}"})


def test_the_shipped_capacity_relation_is_the_uspvdb_fit(capacity_fit):
    shipped = capacity_files.read_capacity_params()
    fitted = capacity_fit["fitted_capacity_relation"]
    for key in capacity_files.RELATION_KEYS:  # `python bench/capacity_fit.py --write` wrote this fit
        assert shipped[key] == pytest.approx(getattr(fitted, key), rel=1e-9), key
    scores = capacity_fit["capacity_fit_scores"]
    assert shipped["heldout"]["rows"] == scores["heldout"]["rows"] > 500
    assert shipped["heldout"]["coverage"] == pytest.approx(scores["heldout"]["coverage"], abs=1e-6)
    assert not set(scores["heldout"]["states"]) & set(scores["train"]["states"])  # grouped by state
    assert 0.5 < fitted.slope < 1.2  # larger plants: lower density (W/m²), sublinear in area


def test_the_capacity_interval_holds_held_out_uspvdb_plants_at_about_the_nominal_rate(capacity_fit):
    """Held-out states only (never fitted, never used for the interval): coverage of the 10–90 % interval."""
    relation = CapacityRelation.from_params(capacity_files.read_capacity_params())
    rows, heldout = capacity_fit["usable_rows"], capacity_fit["heldout_mask"]
    truth_kwp = rows["p_cap_dc"].to_numpy()[heldout] * 1000.0
    estimate, low, high = relation.kwp(rows["p_area"].to_numpy()[heldout])
    coverage = np.mean((truth_kwp >= low) & (truth_kwp <= high))
    nominal = relation.interval_quantiles[1] - relation.interval_quantiles[0]
    assert nominal == pytest.approx(0.8) and abs(coverage - nominal) < 0.15  # measured 0.70 (CA dominates)
    assert np.median(np.abs(estimate - truth_kwp) / truth_kwp) < 0.35


def test_capacity_files_name_the_file_and_the_problem(tmp_path):
    broken = tmp_path / "capacity.toml"
    broken.write_text("[capacity_dc]\nintercept = 1.0\n")
    with pytest.raises(ValueError, match=rf"{broken}.*slope must be a finite number"):
        capacity_files.read_capacity_params(broken)
    csv = tmp_path / "uspvdb.csv"
    csv.write_text("case_id,p_state,p_area\n1,CA,1000\n")
    with pytest.raises(ValueError, match=rf"{csv}: not a USPVDB table, missing column\(s\) p_cap_dc, p_cap_ac"):
        capacity_files.read_uspvdb_capacity(csv)


def test_installation_files_read_back_in_4326(osm_pair, tmp_path):
    west, east = _split_at_centroid(osm_pair[0])
    rows = plan_installations(_rows([west, osm_pair[1], shapely.buffer(east, -1e-5)]), "p", gap_m=10.0)
    parquet, gpkg = region_files.write_installations(rows, tmp_path)
    from_parquet, from_gpkg = gpd.read_parquet(parquet), gpd.read_file(gpkg)
    assert from_parquet.crs.to_epsg() == from_gpkg.crs.to_epsg() == 4326
    assert len(from_parquet) == len(from_gpkg) == rows.num_rows == 2
    assert b"geo" in pq.read_schema(parquet).metadata  # GeoParquet metadata, not bare WKB
    assert pyogrio.read_info(gpkg)["geometry_type"] == "MultiPolygon"  # mixed Polygon / MultiPolygon promoted
    assert from_parquet["detection_ids"].map(list).tolist() == [["d0", "d2"], ["d1"]]
    assert from_gpkg["detection_ids"].tolist() == ["d0,d2", "d1"]
    assert shapely.equals(from_gpkg.geometry.values, from_parquet.geometry.values).all()
    for column in ("capacity_kwp", "capacity_kwp_low", "capacity_kwp_high", "area_m2", "orientation_deg"):
        assert from_gpkg[column].to_numpy() == pytest.approx(from_parquet[column].to_numpy())
    empty = plan_installations(pa.table({}), "p")
    assert empty.num_rows == 0 and empty.schema == rows.schema
    parquet, gpkg = region_files.write_installations(empty, tmp_path / "empty")
    assert len(gpd.read_parquet(parquet)) == len(gpd.read_file(gpkg)) == 0


def test_the_lakehouse_replaces_one_plans_installations_in_one_transaction(settings, osm_pair):
    farm, far = osm_pair
    plan_a = plan_installations(_rows([farm, far], "plan_a"), "plan_a")
    plan_b = plan_installations(_rows([far], "plan_b"), "plan_b")
    con = ducklake.connect(settings)
    try:
        assert ducklake.read_installations(con, settings, "plan_a").num_rows == 0
        assert ducklake.replace_plan_installations(con, settings, "plan_a", plan_a) == 2
        ducklake.replace_plan_installations(con, settings, "plan_b", plan_b)
        before = ducklake.current_snapshot_id(con, settings)
        smaller = plan_installations(_rows([far], "plan_a"), "plan_a")
        ducklake.replace_plan_installations(con, settings, "plan_a", smaller)
        assert ducklake.current_snapshot_id(con, settings) == before + 1  # delete + insert: one snapshot
        stored = ducklake.read_installations(con, settings, "plan_a")
        assert stored.num_rows == 1 and ducklake.read_installations(con, settings, "plan_b").num_rows == 1
        assert stored.column("detection_ids").to_pylist() == [["d0"]]
        assert stored.column("installation_id").to_pylist() == smaller.column("installation_id").to_pylist()
        with pytest.raises(ValueError, match="rows of other plans"):
            ducklake.replace_plan_installations(con, settings, "plan_a", plan_b)
        assert ducklake.read_installations(con, settings, "plan_a").num_rows == 1
        assert ducklake.current_snapshot_id(con, settings) == before + 1
    finally:
        con.close()

"""Label import on the real shared label sets: counts, reprojection, geodesic area, S2/H3, idempotence."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import s2cell
import shapely

from aegir.pipelines.labels import import_labels, list_datasets
from aegir.sample_data import SAMPLE_LABEL_SETS, sample_label_set
from aegir.store import ducklake
from aegir.store.label_files import LabelFileError


def _table(settings, dataset: str):
    con = ducklake.connect(settings)
    try:
        return con.execute(f"SELECT * FROM lake.raw_{dataset} ORDER BY source_row").to_arrow_table()
    finally:
        con.close()


@pytest.mark.parametrize("item", SAMPLE_LABEL_SETS, ids=lambda s: s.dataset)
def test_shared_label_sets_import_with_exact_counts_twice(settings, item):
    path = item.path(settings.sample_data_dir)
    first = import_labels(settings, path, item.dataset, doi=item.doi)
    assert (first.commit.inserted, first.commit.quarantined) == (item.rows, 0)
    second = import_labels(settings, path, item.dataset, doi=item.doi)
    assert (second.commit.inserted, second.commit.already_present) == (0, item.rows)
    assert second.commit.snapshot_id >= first.commit.snapshot_id
    summary = {s["dataset"]: s for s in list_datasets(settings)}
    assert summary[item.dataset]["rows"] == item.rows


def test_ornl_lambert_equal_area_is_reprojected_to_boston_and_area_is_geodesic(settings):
    item = sample_label_set("ornl_boston")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
    table = _table(settings, "ornl_boston")
    lat, lon = np.array(table["centroid_lat"]), np.array(table["centroid_lon"])
    assert 42.2 < lat.min() and lat.max() < 42.45 and -71.2 < lon.min() and lon.max() < -70.95
    # pan_area is the panel area measured by ORNL in the equal-area CRS: the geodesic area must agree closely.
    pan_area, area = np.array(table["pan_area"]), np.array(table["area_m2"])
    assert np.median(np.abs(area - pan_area) / pan_area) < 0.01
    geometry = shapely.from_wkb(table["geometry_wkb"].to_numpy(zero_copy_only=False))
    assert shapely.is_valid(geometry).all()
    assert shapely.equals_exact(geometry, shapely.from_wkt(table["geometry_wkt"].to_pylist()), tolerance=1e-12).all()


def test_tokens_equal_s2cell_and_h3_and_schema_columns(settings):
    item = sample_label_set("osm_austria")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
    table = _table(settings, "osm_austria")
    expected = {
        "dataset_name", "source_file", "geometry_wkt", "geometry_wkb", "area_m2", "centroid_lat", "centroid_lon",
        "s2_token_l10", "s2_token_l13", "s2_token_l17", "h3_12", "imported_at", "row_hash", "id",
    }
    assert expected <= set(table.column_names)
    import h3

    rows = table.slice(0, 300).to_pylist()
    for row in rows:
        for level in (10, 13, 17):
            assert row[f"s2_token_l{level}"] == s2cell.lat_lon_to_token(row["centroid_lat"], row["centroid_lon"], level)
        assert row["h3_12"] == h3.latlng_to_cell(row["centroid_lat"], row["centroid_lon"], 12)


def test_invalid_india_polygons_are_repaired_not_dropped(settings):
    item = sample_label_set("india_solar_farms")
    source = item.path(settings.sample_data_dir)
    import pyogrio

    raw = pyogrio.read_dataframe(source)
    assert (~shapely.is_valid(raw.geometry.values)).sum() > 0  # the real file has self-intersections
    import_labels(settings, source, item.dataset)
    table = _table(settings, item.dataset)
    geometry = shapely.from_wkb(table["geometry_wkb"].to_numpy(zero_copy_only=False))
    assert table.num_rows == 1363 and shapely.is_valid(geometry).all()
    assert set(shapely.get_type_id(geometry)) <= {3, 6}  # polygons only


def test_uspvdb_points_keep_source_columns_and_dates(settings):
    item = sample_label_set("uspvdb")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)
    table = _table(settings, item.dataset)
    assert table.num_rows == 5712 and "case_id" in table.column_names and "p_cap_ac" in table.column_names
    row = table.slice(0, 1).to_pylist()[0]
    assert row["doi"] == "10.5066/P9IA3TUS" and row["area_m2"] == 0.0
    assert abs(row["centroid_lon"] - row["xlong"]) < 1e-9 and abs(row["centroid_lat"] - row["ylat"]) < 1e-9
    assert str(row["label_date"]) == f"{str(row['p_img_date'])[:4]}-{str(row['p_img_date'])[4:6]}-{str(row['p_img_date'])[6:8]}"


# ---- bad input -------------------------------------------------------------------------------------------


def test_csv_bad_rows_are_quarantined_and_good_rows_land(settings, tmp_path):
    csv = tmp_path / "points.csv"
    lines = (settings.sample_data_dir / "labels/uspvdb/uspvdb_v3_0_20250430.csv").read_text(encoding="utf-8-sig").splitlines()
    header = lines[0].split(",")
    bad = lines[2].split(",")
    bad[header.index("ylat")] = "not-a-number"
    csv.write_text("\n".join([lines[0], lines[1], ",".join(bad), lines[3]]) + "\n")
    report = import_labels(settings, csv, "uspv_sample")
    assert (report.commit.inserted, report.commit.quarantined) == (2, 1)
    assert list(report.problems) == [1] and "not-a-number" in report.problems[1]
    con = ducklake.connect(settings)
    try:
        rows = ducklake.quarantine_rows(con, settings, "uspv_sample").to_pylist()
    finally:
        con.close()
    assert rows[0]["source_row"] == 1 and rows[0]["source_file"] == str(csv)
    assert json.loads(rows[0]["raw_record"])["ylat"] == "not-a-number"
    again = import_labels(settings, csv, "uspv_sample")
    assert (again.commit.inserted, again.commit.quarantined) == (0, 0)


def test_csv_without_coordinates_names_the_file(settings, tmp_path):
    csv = tmp_path / "nocoords.csv"
    csv.write_text("name,capacity\na,1\n")
    with pytest.raises(LabelFileError, match=r"nocoords\.csv: no longitude column"):
        import_labels(settings, csv, "nocoords")


def test_shapefile_without_prj_is_an_error_unless_crs_given(settings, tmp_path):
    source = settings.sample_data_dir / "labels/ornl_rooftop_panels/dc/panels_man_dc"
    for suffix in (".shp", ".shx", ".dbf"):
        shutil.copy(source / f"panels_man_dc{suffix}", tmp_path / f"dc{suffix}")
    with pytest.raises(LabelFileError, match=r"dc\.shp: the file declares no CRS \(the \.prj"):
        import_labels(settings, tmp_path / "dc.shp", "ornl_dc")
    prj = (source / "panels_man_dc.prj").read_text()
    report = import_labels(settings, tmp_path / "dc.shp", "ornl_dc", crs=prj)
    assert report.commit.inserted == 1013
    lat = np.array(_table(settings, "ornl_dc")["centroid_lat"])
    assert 38.8 < lat.min() and lat.max() < 39.0


def test_corrupt_file_is_a_clear_error_and_keeps_existing_data(settings, tmp_path):
    item = sample_label_set("ornl_boston")
    import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
    corrupt = tmp_path / "broken.geojson"
    corrupt.write_text('{"type": "FeatureCollection", "features": [ {"type": "Feat')
    with pytest.raises(LabelFileError, match=r"broken\.geojson: cannot read"):
        import_labels(settings, corrupt, item.dataset)
    assert _table(settings, item.dataset).num_rows == 782


def test_empty_and_invalid_geometries(settings, tmp_path):
    features = [
        {"type": "Feature", "properties": {"n": 0}, "geometry": {"type": "Polygon", "coordinates": [[[10, 50], [10.001, 50], [10.001, 50.001], [10, 50.001], [10, 50]]]}},
        {"type": "Feature", "properties": {"n": 1}, "geometry": None},
        {"type": "Feature", "properties": {"n": 2}, "geometry": {"type": "Polygon", "coordinates": []}},
        # bow-tie: invalid, repaired into two triangles
        {"type": "Feature", "properties": {"n": 3}, "geometry": {"type": "Polygon", "coordinates": [[[11, 50], [11.001, 50.001], [11.001, 50], [11, 50.001], [11, 50]]]}},
        # zero-area spike: make_valid leaves no polygon
        {"type": "Feature", "properties": {"n": 4}, "geometry": {"type": "Polygon", "coordinates": [[[12, 50], [12.001, 50], [12, 50], [12.001, 50], [12, 50]]]}},
    ]
    path = tmp_path / "mixed.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    report = import_labels(settings, path, "mixed")
    assert report.commit.inserted == 2
    assert set(report.problems) == {1, 2, 4}
    assert "missing" in report.problems[1] and "empty" in report.problems[2] and "repaired" in report.problems[4]
    table = _table(settings, "mixed")
    assert table["n"].to_pylist() == [0, 3]
    bowtie = shapely.from_wkb(table["geometry_wkb"][1].as_py())
    assert bowtie.is_valid and bowtie.geom_type == "MultiPolygon" and table["area_m2"][1].as_py() > 0


def test_geopackage_and_geoparquet_import(settings, tmp_path):
    import geopandas as gpd

    frame = gpd.read_file(sample_label_set("osm_austria").path(settings.sample_data_dir)).head(50)
    frame.to_crs("EPSG:31287").to_file(tmp_path / "at.gpkg")
    frame.to_parquet(tmp_path / "at.parquet")
    from_gpkg = import_labels(settings, tmp_path / "at.gpkg", "at_gpkg")
    from_parquet = import_labels(settings, tmp_path / "at.parquet", "at_parquet")
    assert from_gpkg.commit.inserted == from_parquet.commit.inserted == 50
    a, b = _table(settings, "at_gpkg"), _table(settings, "at_parquet")
    assert np.allclose(a["centroid_lat"], b["centroid_lat"], atol=1e-7)
    assert np.allclose(a["area_m2"], b["area_m2"], rtol=1e-4)
    assert a["s2_token_l13"].to_pylist() == b["s2_token_l13"].to_pylist()

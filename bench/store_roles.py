"""Benchmark: the same work on DuckLake and on Lance, to show why labels live in one and chips in the other.

Two data sets, both real:
  labels  every shared label set imported into DuckLake (15,458 polygons, ``raw_<dataset>`` tables), and the same
          rows copied into one Lance table;
  chips   the 60 Jiang PV01 tiles (256×256×3 uint8 + mask, raw bytes) repeated to ``--chips`` rows, written both
          as the LanceDB ``training_data`` table and as a DuckLake table with BLOB columns.
Timed (median of ``--repeat`` runs, one process, warm OS cache):
  label aggregate   count + geodesic area per dataset
  label bbox        labels whose centroid lies in a lon/lat box (Austria); polygons intersecting it
  label update      set the DOI of one data set (a transaction / a new version)
  chip take         32 random chips by row position (what a shuffled training batch asks for)
  chip by uuid      32 random chips by uuid
  chip scan         read every chip's bytes once (an epoch, sequential)
Run: ``python bench/store_roles.py [--chips N] [--repeat N]``. Prints times and DuckLake/Lance ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import lance
import numpy as np
import pyarrow as pa
import shapely

from aegir.config import Settings, load_settings
from aegir.pipelines import labels as label_jobs
from aegir.pipelines.dataset import build_dataset_from_images
from aegir.sample_data import SAMPLE_LABEL_SETS
from aegir.store import ducklake, lance_io

LABEL_COLUMNS = ["dataset_name", "area_m2", "centroid_lon", "centroid_lat", "doi", "geometry_wkb"]
AUSTRIA = (9.5, 46.3, 17.2, 49.1)  # lon/lat box, EPSG:4326
BATCH = 32


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    """Median wall seconds of ``repeat`` calls and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def import_labels(settings: Settings) -> None:
    for item in SAMPLE_LABEL_SETS:
        label_jobs.import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)


def labels_view_sql(con: duckdb.DuckDBPyConnection, settings: Settings) -> str:
    """One UNION ALL over every ``raw_<dataset>`` table, with the shared columns."""
    cols = ", ".join(LABEL_COLUMNS)
    tables = ducklake.label_tables(con, settings)
    return " UNION ALL ".join(f"SELECT {cols} FROM {settings.ducklake_alias}.{t}" for t in tables)


def label_benchmarks(settings: Settings, root: Path, repeat: int) -> list[tuple[str, float, float, str]]:
    con = ducklake.connect(settings)
    union = labels_view_sql(con, settings)
    labels = con.execute(union).arrow().read_all()
    ds = lance.write_dataset(labels, str(root / "labels.lance"))
    agg_sql = "SELECT dataset_name, count(*), sum(area_m2) FROM ({}) GROUP BY 1 ORDER BY 1"
    bbox = "centroid_lon BETWEEN {} AND {} AND centroid_lat BETWEEN {} AND {}".format(
        AUSTRIA[0], AUSTRIA[2], AUSTRIA[1], AUSTRIA[3])

    def lance_aggregate():
        table = lance.dataset(ds.uri).to_table(columns=["dataset_name", "area_m2"])
        return table.group_by("dataset_name").aggregate([("area_m2", "count"), ("area_m2", "sum")])

    t_duck_agg, duck_agg = timed(lambda: con.execute(agg_sql.format(union)).fetchall(), repeat)
    t_lance_agg, lance_agg = timed(lance_aggregate, repeat)
    assert sum(r[1] for r in duck_agg) == lance_agg.column(1).to_numpy().sum() == labels.num_rows
    t_duck_bbox, n_duck = timed(lambda: con.execute(
        f"SELECT count(*) FROM ({union}) WHERE {bbox}").fetchone()[0], repeat)
    t_lance_bbox, n_lance = timed(lambda: lance.dataset(ds.uri).count_rows(filter=bbox), repeat)
    assert n_duck == n_lance > 0
    box_wkt = "POLYGON(({0} {1}, {2} {1}, {2} {3}, {0} {3}, {0} {1}))".format(*AUSTRIA)
    t_duck_geo, g_duck = timed(lambda: con.execute(
        f"SELECT count(*) FROM ({union}) WHERE ST_Intersects(ST_GeomFromWKB(geometry_wkb), "
        f"ST_GeomFromText('{box_wkt}'))").fetchone()[0], repeat)

    def lance_intersects():
        wkb = lance.dataset(ds.uri).to_table(columns=["geometry_wkb"])["geometry_wkb"].to_numpy(zero_copy_only=False)
        return int(shapely.intersects(shapely.from_wkb(wkb), shapely.box(*AUSTRIA)).sum())

    t_lance_geo, g_lance = timed(lance_intersects, repeat)
    assert g_duck == g_lance >= n_duck
    table = ducklake.label_tables(con, settings)[0]
    t_duck_upd, _ = timed(lambda: con.execute(
        f"UPDATE {settings.ducklake_alias}.{table} SET doi = 'bench'").fetchall(), repeat)
    t_lance_upd, _ = timed(lambda: lance.dataset(ds.uri).update({"doi": "'bench'"},
                                                                 where=f"dataset_name = '{table[4:]}'"), repeat)
    n = labels.num_rows
    return [
        (f"label aggregate ({n:,} rows)", t_duck_agg, t_lance_agg, "count + area per dataset"),
        ("label centroid-in-box filter", t_duck_bbox, t_lance_bbox, f"{n_duck:,} label centroids in the Austria box"),
        ("label polygons intersecting a box", t_duck_geo, t_lance_geo, "DuckDB spatial vs Lance scan + shapely"),
        (f"label update ({table})", t_duck_upd, t_lance_upd, "one snapshot / one version"),
    ]


def chip_tables(settings: Settings, root: Path, chips: int) -> tuple[lance.LanceDataset, duckdb.DuckDBPyConnection,
                                                                   str, dict[str, float]]:
    """The Jiang chips repeated to ``chips`` rows in Lance and in a DuckLake BLOB table; write seconds each."""
    jiang = settings.sample_data_dir / "vhr" / "jiang_pv01"
    uri = str(root / "lancedb" / "training_data")
    build_dataset_from_images(settings, jiang / "images", jiang / "masks", uri=uri)
    base = lance_io.open_training_table(uri, settings.lancedb_root, create=False).to_arrow()
    base = base.select(["uuid", "vhr_image_chip", "generated_mask"])
    copies = [base.set_column(0, "uuid", pa.array([f"{u}-{k}" for u in base["uuid"].to_pylist()]))
              for k in range(-(-chips // base.num_rows))]
    full = pa.concat_tables(copies).slice(0, chips)
    start = time.perf_counter()
    ds = lance.write_dataset(full, str(root / "chips.lance"), max_rows_per_file=480, data_storage_version="2.0")
    lance_write = time.perf_counter() - start
    con = ducklake.connect(settings)
    start = time.perf_counter()
    con.register("chip_rows", full)
    con.execute(f"CREATE TABLE {settings.ducklake_alias}.chips AS SELECT * FROM chip_rows")
    duck_write = time.perf_counter() - start
    return ds, con, f"{settings.ducklake_alias}.chips", {"lance": lance_write, "ducklake": duck_write}


def chip_benchmarks(settings: Settings, root: Path, chips: int, repeat: int) -> list[tuple[str, float, float, str]]:
    ds, con, table, write = chip_tables(settings, root, chips)
    rng = np.random.default_rng(0)
    uuids = ds.to_table(columns=["uuid"])["uuid"].to_pylist()

    def duck_take():
        rows = sorted(rng.choice(chips, BATCH, replace=False).tolist())
        return con.execute(f"SELECT vhr_image_chip, generated_mask FROM (SELECT *, row_number() OVER () - 1 AS i "
                           f"FROM {table}) WHERE i IN ({', '.join(map(str, rows))})").fetchall()

    def lance_take():
        return ds.take(rng.choice(chips, BATCH, replace=False), columns=["vhr_image_chip", "generated_mask"])

    def duck_uuid():
        keys = [uuids[i] for i in rng.choice(chips, BATCH, replace=False)]
        return con.execute(f"SELECT vhr_image_chip FROM {table} WHERE uuid IN (SELECT unnest(?))", [keys]).fetchall()

    def lance_uuid():
        keys = [uuids[i] for i in rng.choice(chips, BATCH, replace=False)]
        return ds.to_table(columns=["vhr_image_chip"], filter="uuid IN ({})".format(
            ", ".join(f"'{k}'" for k in keys)))

    def duck_scan():
        reader = con.execute(f"SELECT vhr_image_chip, generated_mask FROM {table}").to_arrow_reader(1024)
        return sum(batch.num_rows for batch in reader)

    def lance_scan():
        return sum(b.num_rows for b in ds.to_batches(columns=["vhr_image_chip", "generated_mask"], batch_size=1024))

    t_dt, rows_d = timed(duck_take, repeat)
    t_lt, rows_l = timed(lance_take, repeat)
    assert len(rows_d) == rows_l.num_rows == BATCH
    t_du, rows_du = timed(duck_uuid, repeat)
    t_lu, rows_lu = timed(lance_uuid, repeat)
    assert len(rows_du) == rows_lu.num_rows == BATCH
    t_ds, n_d = timed(duck_scan, max(1, repeat // 2))
    t_ls, n_l = timed(lance_scan, max(1, repeat // 2))
    assert n_d == n_l == chips
    mb = sum(len(b) for b in ds.to_table(columns=["vhr_image_chip"])["vhr_image_chip"].to_pylist()) / 1e6
    return [
        (f"chip write ({chips:,} chips, {mb:.0f} MB of pixels)", write["ducklake"], write["lance"], "one commit each"),
        (f"chip take {BATCH} by position", t_dt, t_lt, "shuffled training batch"),
        (f"chip take {BATCH} by uuid", t_du, t_lu, "no index on either"),
        ("chip scan (one epoch)", t_ds, t_ls, f"{chips:,} rows, batches of 1,024"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", type=int, default=1_920)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="aegir-bench-roles-") as tmp:
        root = Path(tmp)
        settings = base.replace(ducklake_catalog=str(root / "catalog.ducklake"),
                                ducklake_data_path=str(root / "files") + "/", lancedb_root=str(root / "lancedb"))
        import_labels(settings)
        rows = label_benchmarks(settings, root, args.repeat) + chip_benchmarks(settings, root, args.chips, args.repeat)
    print(f"{'work':<44}{'DuckLake ms':>12}{'Lance ms':>10}{'DuckLake/Lance':>16}  note")
    for name, duck, lan, note in rows:
        print(f"{name:<44}{duck * 1e3:>12.1f}{lan * 1e3:>10.1f}{duck / lan:>15.2f}×  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Storage logic of the LanceDB training_data table (synthetic chips: these test storage, not data)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import shapely

from aegir.store.chip_codec import decode_raw_array, encode_raw_array
from aegir.store.lance_io import (
    INDEX_COLUMNS,
    TRAINING_DATA_SCHEMA,
    StoreError,
    UpsertResult,
    build_where_clause,
    ensure_scalar_indexes,
    filter_rows,
    open_training_table,
    read_version,
    resolve_table_location,
    stored_s2_levels,
    table_summary,
    table_versions,
    training_data_schema,
    upsert_training_rows,
)

CELLS = ["89c25", "89c27", "89c2f"]


def make_row(i: int, **meta_overrides: object) -> dict:
    rng = np.random.default_rng(i)
    vhr = rng.integers(0, 255, size=(3, 8, 8), dtype=np.uint8)
    mask = (rng.random((8, 8)) > 0.5).astype(np.uint8) if i % 2 == 0 else None
    lat, lon = 40.0 + i * 1e-3, -74.0 - i * 1e-3
    meta = {
        "dataset": "ds_a" if i < 6 else "ds_b",
        "source_file": f"labels/file_{i}.geojson",
        "sample_id": f"s{i}",
        "s2_token_l10": "89c2",
        "s2_token_l13": CELLS[i % 3],
        "s2_token_l17": f"{CELLS[i % 3]}{i:03d}",
        "h3_12": f"8c2a100d{i:07x}",
        "centroid_lat": lat,
        "centroid_lon": lon,
        "acquired_at": dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc),
        "sensor": "aerial",
        "gsd_m": 0.3,
        "crs": "EPSG:4326",
        "transform": [3e-6, 0.0, lon, 0.0, -3e-6, lat],
        "vhr_shape": [3, 8, 8],
        "vhr_dtype": "uint8",
        "vhr_encoding": "raw",
        "mask_shape": [8, 8] if mask is not None else None,
        "mask_encoding": "raw" if mask is not None else None,
        "mask_source": "ground_truth" if mask is not None else None,
        "pv_fraction": float(mask.mean()) if mask is not None else None,
        "provenance": {"backend": "import", "round": 0, "created_at": dt.datetime(2024, 6, 1)},
    }
    meta.update(meta_overrides)
    return {
        "uuid": f"uuid-{i:03d}",
        "prompt_geometry": shapely.Point(lon, lat).buffer(1e-5).wkb,
        "vhr_image_chip": encode_raw_array(vhr),
        "generated_mask": encode_raw_array(mask) if mask is not None else None,
        "msi_image_chip": None,
        "metadata": meta,
    }


@pytest.fixture()
def table(tmp_path: Path):
    return open_training_table(None, str(tmp_path / "lancedb"))


@pytest.fixture()
def filled(table):
    upsert_training_rows(table, [make_row(i) for i in range(10)])
    return table


def test_create_then_open(tmp_path: Path) -> None:
    root = str(tmp_path / "lancedb")
    with pytest.raises(StoreError, match="no LanceDB training table"):
        open_training_table(None, root, create=False)
    assert not (tmp_path / "lancedb").exists()
    created = open_training_table(None, root)
    assert created.schema.equals(TRAINING_DATA_SCHEMA)
    assert created.count_rows() == 0
    reopened = open_training_table(str(tmp_path / "lancedb" / "training_data.lance"), "unused", create=False)
    assert reopened.name == "training_data"


def test_open_rejects_foreign_schema(tmp_path: Path) -> None:
    import lancedb

    lancedb.connect(str(tmp_path)).create_table("other", data=pa.table({"uuid": ["a"], "x": [1]}))
    with pytest.raises(StoreError, match=r"other\.lance.*missing column prompt_geometry"):
        open_training_table(str(tmp_path / "other"), "unused", create=False)


def test_upsert_is_idempotent_and_versioned(table) -> None:
    first = upsert_training_rows(table, [make_row(i) for i in range(10)])
    assert first == UpsertResult(inserted=10, updated=0, version=first.version)
    assert table.count_rows() == 10

    second = upsert_training_rows(table, [make_row(i, sensor="satellite") for i in range(10)])
    assert (second.inserted, second.updated) == (0, 10)
    assert second.version > first.version
    assert table.count_rows() == 10
    assert set(filter_rows(table, {}, ["metadata.sensor"]).column(0).to_pylist()) == {"satellite"}

    old = read_version(table, first.version)
    assert set(old.column("metadata").combine_chunks().field("sensor").to_pylist()) == {"aerial"}
    assert table.version == second.version  # reading an old version does not move the table
    assert read_version(table, 1).num_rows == 0  # version 1 is the empty table
    versions = table_versions(table)
    assert [v["version"] for v in versions][-1] == second.version
    assert versions[0]["rows"] == 0 and versions[-1]["rows"] == 10
    with pytest.raises(StoreError, match="does not exist"):
        read_version(table, 999)


def test_upsert_accepts_arrow_and_mixes_insert_update(filled) -> None:
    batch = pa.Table.from_pylist([make_row(i) for i in range(8, 12)], schema=TRAINING_DATA_SCHEMA)
    result = upsert_training_rows(filled, batch)
    assert (result.inserted, result.updated) == (2, 2)
    assert filled.count_rows() == 12


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r["metadata"].update(centroid_lat="north"), r"row 3: column metadata\.centroid_lat"),
        (lambda r: r["metadata"].update(dataset=None), r"row 3: column metadata\.dataset is null"),
        (lambda r: r.update(vhr_image_chip=None), r"row 3: column vhr_image_chip is null"),
        (lambda r: r["metadata"].update(bogus=1), r"row 3: unknown field\(s\) \['bogus'\] in column metadata"),
        (lambda r: r.update(extra=1), r"row 3: unknown column\(s\) \['extra'\]"),
        (lambda r: r["metadata"].update(transform=[1.0, 2.0]), r"row 3: column metadata\.transform must hold 6"),
        (lambda r: r["metadata"].update(vhr_encoding="jpeg"), r"row 3: column metadata\.vhr_encoding must be one"),
        (lambda r: r["metadata"]["provenance"].update(round="x"), r"row 3: column metadata\.provenance\.round"),
    ],
)
def test_invalid_batch_writes_nothing(filled, mutate, message) -> None:
    before_version, before = filled.version, filled.to_arrow().sort_by("uuid")
    rows = [make_row(i, sensor="changed") for i in range(5)]
    mutate(rows[3])
    with pytest.raises(StoreError, match=message):
        upsert_training_rows(filled, rows)
    assert filled.version == before_version
    assert filled.to_arrow().sort_by("uuid").equals(before)


def test_duplicate_uuids_in_batch_raise(filled) -> None:
    version = filled.version
    rows = [make_row(1), make_row(2), make_row(1, sensor="dup")]
    with pytest.raises(StoreError, match=r"duplicate uuid 'uuid-001' in one batch \(rows \[0, 2\]\)"):
        upsert_training_rows(filled, rows)
    assert filled.version == version


def test_scalar_indexes_and_s2_filters(table) -> None:
    assert ensure_scalar_indexes(table) == []  # empty table: nothing to index
    upsert_training_rows(table, [make_row(i) for i in range(10)])
    assert ensure_scalar_indexes(table) == list(INDEX_COLUMNS)
    indexed = {tuple(idx.columns) for idx in table.list_indices()}
    assert {(c,) for c in INDEX_COLUMNS} <= indexed
    assert ensure_scalar_indexes(table) == []  # idempotent: nothing stale

    got = filter_rows(table, {"metadata.s2_token_l13": "89c27"}, ["uuid"])
    assert sorted(got.column("uuid").to_pylist()) == [f"uuid-{i:03d}" for i in range(10) if i % 3 == 1]
    plan = table.search().where(build_where_clause({"s2_token_l13": "89c27"})).explain_plan(verbose=True)
    assert "ScalarIndexQuery" in plan and "s2_token_l13_idx" in plan

    upsert_training_rows(table, [make_row(10)])  # new rows make the indexes stale; a rebuild covers them
    assert "metadata.s2_token_l13" in ensure_scalar_indexes(table)
    assert filter_rows(table, {"s2_token_l13": "89c27"}, ["uuid"]).num_rows == 4

    prefix = filter_rows(table, {"s2_token_l17": ("prefix", "89c2f")}, ["uuid"])
    assert sorted(prefix.column("uuid").to_pylist()) == [f"uuid-{i:03d}" for i in range(11) if i % 3 == 2]
    both = filter_rows(table, {"s2_token_l13": ("89c25", "89c2f"), "dataset": "ds_b"}, ["uuid"], limit=2)
    assert both.num_rows == 2


def test_filter_rows_rejects_unknown_fields_and_quotes_values(filled) -> None:
    with pytest.raises(StoreError, match="unknown field"):
        filter_rows(filled, {"uuid = uuid OR 1": "x"})
    with pytest.raises(StoreError, match="unknown field"):
        filter_rows(filled, {"metadata.nope": "x"})
    with pytest.raises(StoreError, match="unknown field"):
        filter_rows(filled, {"uuid": "uuid-001"}, columns=["uuid; DROP"])
    with pytest.raises(StoreError, match="cannot be filtered"):
        filter_rows(filled, {"vhr_image_chip": "x"})
    with pytest.raises(StoreError, match="is a string"):
        filter_rows(filled, {"uuid": 1})

    attack = "x' OR 1=1 --"
    assert build_where_clause({"uuid": attack}) == "(uuid = 'x'' OR 1=1 --')"
    assert filter_rows(filled, {"uuid": attack}).num_rows == 0
    assert filter_rows(filled, {"s2_token_l13": ("prefix", attack)}).num_rows == 0
    assert filter_rows(filled, {"uuid": [attack, "uuid-004"]}, ["uuid"]).column(0).to_pylist() == ["uuid-004"]

    upsert_training_rows(filled, [make_row(20, sample_id=attack)])
    hit = filter_rows(filled, {"sample_id": attack}, ["uuid", "metadata.sample_id"])
    assert hit.column("uuid").to_pylist() == ["uuid-020"]


def test_filter_value_kinds(filled) -> None:
    assert filter_rows(filled, {"generated_mask": None}).num_rows == 5
    assert filter_rows(filled, {"centroid_lat": 40.0 + 2 * 1e-3}).num_rows == 1
    assert filter_rows(filled, {"metadata.provenance.round": 0}).num_rows == 10
    when = dt.datetime(2024, 5, 1, tzinfo=dt.timezone.utc)
    assert filter_rows(filled, {"acquired_at": when}).num_rows == 10
    assert filter_rows(filled, {"uuid": []}).num_rows == 0
    assert filter_rows(filled, {}, limit=3).num_rows == 3


def test_table_summary(filled) -> None:
    summary = table_summary(filled)
    assert summary["rows"] == 10
    assert summary["version"] == filled.version
    assert summary["versions"] == len(table_versions(filled))
    assert summary["size_bytes"] > 0
    assert summary["s2_l13_cells"] == 3
    assert summary["datasets"] == {"ds_a": 6, "ds_b": 4}
    assert (summary["rows_with_mask"], summary["rows_without_mask"]) == (5, 5)


def test_schema_follows_the_configured_s2_levels_and_h3_resolution(tmp_path: Path) -> None:
    assert training_data_schema().equals(TRAINING_DATA_SCHEMA)
    assert training_data_schema((17, 10, 13), 12).equals(TRAINING_DATA_SCHEMA)  # levels are sorted
    table = open_training_table("custom", str(tmp_path), s2_levels=(12, 8), h3_resolution=9)
    names = [f.name for f in table.schema.field("metadata").type]
    assert stored_s2_levels(table.schema) == (8, 12) and "h3_9" in names and "s2_token_l10" not in names
    row = make_row(0)
    meta = {k: v for k, v in row["metadata"].items() if not k.startswith(("s2_token_", "h3_"))}
    custom = {**row, "metadata": {**meta, "s2_token_l8": "89c", "s2_token_l12": "89c25", "h3_9": "892a1008"}}
    assert upsert_training_rows(table, [custom]).inserted == 1
    with pytest.raises(StoreError, match=r"unknown field\(s\) \['h3_12', 's2_token_l10'"):
        upsert_training_rows(table, [make_row(1)])  # rows of the default levels do not fit this table
    assert ensure_scalar_indexes(table) == ["uuid", "metadata.dataset", "metadata.s2_token_l8",
                                            "metadata.s2_token_l12"]
    assert open_training_table("custom", str(tmp_path), create=False).count_rows() == 1


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (None, ("/root/db", "training_data")),
        ("data/lancedb/training_data", ("data/lancedb", "training_data")),
        ("data/lancedb/training_data.lance", ("data/lancedb", "training_data")),
        ("data/lancedb/training_data.lance/", ("data/lancedb", "training_data")),
        ("/abs/db/other", ("/abs/db", "other")),
        ("s3://bucket/db/training_data", ("s3://bucket/db", "training_data")),
        ("gs://bucket/training_data.lance", ("gs://bucket", "training_data")),
        ("my_table", ("/root/db", "my_table")),
    ],
)
def test_resolve_table_location(uri, expected) -> None:
    assert resolve_table_location(uri, "/root/db") == expected


@pytest.mark.parametrize("uri", ["", "s3://", "s3://training_data", "db/.lance"])
def test_resolve_table_location_rejects(uri) -> None:
    with pytest.raises(StoreError):
        resolve_table_location(uri, "/root/db")


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32", "int16"])
def test_raw_round_trip(dtype) -> None:
    arr = (np.arange(4 * 5 * 6) % 200).astype(dtype).reshape(4, 5, 6)
    view = arr[:, ::-1, :]  # not C-contiguous
    buf = encode_raw_array(view)
    assert len(buf) == view.nbytes
    back = decode_raw_array(buf, view.shape, dtype)
    np.testing.assert_array_equal(back, view)
    assert back.flags.writeable and back.dtype == np.dtype(dtype)
    with pytest.raises(ValueError, match="do not hold"):
        decode_raw_array(buf[:-1], view.shape, dtype)


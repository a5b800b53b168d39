"""The one SQL literal builder (aegir.store.sql): quoting, IN lists, the S2 cell-id range condition."""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import pytest
import s2cell

from aegir.store import sql


def test_literals_by_type():
    assert sql.literal("o'brien") == "'o''brien'"
    assert sql.literal("x' OR 1=1 --") == "'x'' OR 1=1 --'"
    assert (sql.literal(True), sql.literal(False)) == ("TRUE", "FALSE")
    assert (sql.literal(3), sql.literal(np.int64(3)), sql.literal(0.25)) == ("3", "3", "0.25")
    when = dt.datetime(2024, 5, 1, 12, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert sql.literal(when) == "TIMESTAMP '2024-05-01 10:00:00.000000'"
    assert sql.literal(dt.datetime(2024, 5, 1)) == "TIMESTAMP '2024-05-01 00:00:00.000000'"
    with pytest.raises(ValueError, match="finite"):
        sql.literal(float("nan"))
    with pytest.raises(TypeError):
        sql.literal(b"bytes")


def test_in_lists():
    assert sql.in_list("uuid", ["a", "b'c"]) == "uuid IN ('a', 'b''c')"
    assert sql.in_list("uuid", ["a"], negate=True) == "uuid NOT IN ('a')"
    assert (sql.in_list("uuid", []), sql.in_list("uuid", [], negate=True)) == ("FALSE", "TRUE")


def test_quoted_values_round_trip_through_duckdb():
    for text in ("plain", "o'brien", "''", "x' OR 1=1 --", "multi\nline"):
        assert duckdb.sql(f"SELECT {sql.literal(text)}").fetchone()[0] == text


def test_s2_cell_condition_selects_descendants():
    lat, lon = 40.7128, -74.0060
    leaf = s2cell.lat_lon_to_token(lat, lon, 17)
    other = s2cell.lat_lon_to_token(-33.9, 151.2, 17)
    for level in (3, 10, 13, 17):
        cell = s2cell.lat_lon_to_token(lat, lon, level)
        condition = sql.s2_cell_condition("t", cell)
        rows = duckdb.sql(f"SELECT t FROM (VALUES ('{leaf}'), ('{other}')) v(t) WHERE {condition}").fetchall()
        assert rows == [(leaf,)]
    low, high = sql.s2_descendant_range(leaf)
    assert low <= s2cell.token_to_cell_id(leaf) <= high
    with pytest.raises(ValueError, match="level 17 or coarser"):
        sql.s2_descendant_range(s2cell.lat_lon_to_token(lat, lon, 20))

"""Chip embeddings + vector search on the real Jiang PV01 table with the tiny trained checkpoint (issue #8)."""

from __future__ import annotations

import json

import lancedb
import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from aegir.cli import app
from aegir.store import embedding_store
from aegir.store.lance_io import StoreError

from conftest import JIANG_PV01

runner = CliRunner()


def _cli(*args: str):
    return runner.invoke(app, list(args))


def _json(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def embedded(jiang_table, trained):
    """(table uri, checkpoint, first embed report, second embed report, embeddings table)."""
    settings, uri, _ = jiang_table
    ckpt = trained[1]["best_checkpoint"]
    first = _json(_cli("dataset", "embed", "--checkpoint", ckpt, "--uri", uri, "--json"))
    second = _json(_cli("dataset", "embed", "--checkpoint", ckpt, "--uri", uri, "--json"))
    table = embedding_store.open_embeddings_table(embedding_store.embeddings_root(uri, settings.lancedb_root))
    return uri, ckpt, first, second, table


def _rows(table) -> list[dict]:
    return table.search().select(["uuid", "sample_id", "s2_token_l13", "vector"]).limit(None).to_arrow().to_pylist()


def test_embed_every_chip_once_idempotent(embedded, jiang_table):
    _, _, first, second, table = embedded
    n = jiang_table[2].count_rows()
    assert first["embedded"] == first["inserted"] == n == 60
    assert first["model"].startswith("ckpt:resnet18@") and first["dim"] == 512
    assert second["embedded"] == second["inserted"] == second["updated"] == 0
    assert second["skipped_existing"] == n and second["model"] == first["model"]
    assert table.count_rows() == n
    assert first["index"]["search"] == "exact" and first["index"]["vector_index"] is None  # 60 rows < 256
    assert pa.types.is_fixed_size_list(table.schema.field("vector").type)
    rows = _rows(table)
    vectors = np.array([r["vector"] for r in rows], dtype=np.float32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert len({r["uuid"] for r in rows}) == n


def test_similar_by_chip(embedded):
    uri, _, _, _, table = embedded
    query = _rows(table)[5]
    with_self = _json(_cli("search", "similar", "--chip", query["uuid"], "-k", "5", "--uri", uri,
                           "--include-self", "--json"))
    hits = with_self["neighbours"]
    assert len(hits) == 5 and hits[0]["uuid"] == query["uuid"] and hits[0]["distance"] == pytest.approx(0, abs=1e-5)
    distances = [h["distance"] for h in hits]
    assert distances == sorted(distances)
    without = _json(_cli("search", "similar", "--chip", query["uuid"], "-k", "5", "--uri", uri, "--json"))
    assert query["uuid"] not in [h["uuid"] for h in without["neighbours"]]
    assert [h["uuid"] for h in without["neighbours"]][:4] == [h["uuid"] for h in hits[1:5]]


def test_similar_by_image_file_finds_its_own_chip(embedded):
    uri, _, _, _, table = embedded
    by_stem = {r["sample_id"]: r["uuid"] for r in _rows(table)}
    path = sorted((JIANG_PV01 / "images").glob("*.bmp"))[7]
    result = _json(_cli("search", "similar", "--image", str(path), "-k", "3", "--uri", uri, "--json"))
    top = result["neighbours"][0]
    assert top["uuid"] == by_stem[path.stem] and top["distance"] == pytest.approx(0, abs=1e-4)


def test_prefilter_restricts_to_one_s2_cell(embedded):
    uri, _, _, _, table = embedded
    rows = _rows(table)
    cells = {}
    for r in rows:
        cells.setdefault(r["s2_token_l13"], []).append(r["uuid"])
    cell, members = max(cells.items(), key=lambda kv: len(kv[1]))
    assert len(cells) > 1 and 1 < len(members) < len(rows)
    outsider = next(r["uuid"] for r in rows if r["s2_token_l13"] != cell)
    result = _json(_cli("search", "similar", "--chip", outsider, "-k", "50", "--where", f"s2_token_l13={cell}",
                        "--uri", uri, "--json"))
    assert sorted(h["uuid"] for h in result["neighbours"]) == sorted(members)  # every chip of the cell, no other
    assert result["filters"] == {"s2_token_l13": cell}
    none = _json(_cli("search", "similar", "--chip", outsider, "--where", "dataset=no_such_dataset", "--uri", uri,
                      "--json"))
    assert none["neighbours"] == []


@pytest.mark.parametrize("where", [
    "dataset='x' OR 1=1",
    "dataset=x' OR '1'='1",
    "dataset=jiang_pv01; DROP TABLE chip_embeddings",
    "s2_token_l13=35b1248c' --",
    "1=1",
    "dataset",
    "model=x",
    "uuid IS NOT NULL OR dataset=x",
    "acquired_from=2020-01-01' OR 1=1",
])
def test_injection_attempts_are_rejected(embedded, where):
    uri, _, _, _, table = embedded
    chip = _rows(table)[0]["uuid"]
    result = _cli("search", "similar", "--chip", chip, "--where", where, "--uri", uri, "--json")
    assert result.exit_code == 1
    assert "error:" in result.output
    assert any(s in result.output for s in ("invalid value", "unknown filter field", "expected key=value",
                                           "invalid date"))


def test_python_api_filters_are_validated_and_quoted(embedded):
    _, _, _, _, table = embedded
    with pytest.raises(StoreError, match="invalid value"):
        embedding_store.filter_clause({"dataset": "x' OR '1'='1"}, None, table.schema)
    with pytest.raises(StoreError, match="unknown filter field"):
        embedding_store.filter_clause({"dataset = 'x' OR 1": "1"}, None, table.schema)
    with pytest.raises(StoreError, match="invalid value"):
        embedding_store.search_vectors(table, np.ones(512), exclude_uuids=["x') OR (1=1"])
    clause = embedding_store.filter_clause({"dataset": ["a", "b"], "acquired_from": "2020-01-02"}, "m:1",
                                           table.schema)
    assert clause == ("(dataset IN ('a', 'b')) AND (model = 'm:1') AND "
                      "(acquired_at >= TIMESTAMP '2020-01-02 00:00:00.000000')")


def test_ann_index_on_enough_rows(tmp_path):
    rng = np.random.default_rng(0)
    n, dim = 600, 32
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    table = embedding_store.open_embeddings_table(str(tmp_path), dim=dim)
    rows = pa.table({"uuid": [f"u{i}" for i in range(n)], "model": ["m"] * n,
                     "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
                     "dataset": ["a" if i % 2 else "b" for i in range(n)]})
    assert embedding_store.upsert_embeddings(table, rows)["inserted"] == n
    assert embedding_store.upsert_embeddings(table, rows) == {"inserted": 0, "updated": n, "version": table.version}
    info = embedding_store.ensure_indexes(table)
    assert info["vector_index"] == "IVF_PQ" and embedding_store.has_vector_index(table)
    hits = embedding_store.search_vectors(table, vectors[3], k=5, model="m")
    assert hits[0]["uuid"] == "u3" and hits[0]["distance"] == pytest.approx(0, abs=1e-4)
    odd = embedding_store.search_vectors(table, vectors[3], k=20, filters={"dataset": "a"}, model="m")
    assert len(odd) == 20 and all(h["dataset"] == "a" for h in odd)
    assert lancedb.connect(str(tmp_path)).open_table("chip_embeddings").count_rows() == n

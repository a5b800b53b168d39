"""Prompts dataflow and the CLI contract, on the real ORNL and USPVDB label sets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import pytest
import shapely
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines.labels import build_prompts, import_labels, list_datasets
from aegir.sample_data import sample_label_set
from aegir.store import ducklake


def _import(settings, name):
    item = sample_label_set(name)
    return import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)


@pytest.fixture()
def lake(settings):
    _import(settings, "ornl_boston")
    _import(settings, "uspvdb")
    return settings


def test_prompts_have_stable_uuids_and_geometry(lake):
    prompts = build_prompts(lake, ducklake.LabelQuery(datasets=("ornl_boston",)))
    assert prompts.num_rows == 782
    assert prompts.column_names[:4] == ["uuid", "dataset", "prompt_geometry", "prompt_kind"]
    again = build_prompts(lake, ducklake.LabelQuery(datasets=("ornl_boston",)))
    assert prompts["uuid"].to_pylist() == again["uuid"].to_pylist()
    assert len(set(prompts["uuid"].to_pylist())) == 782
    geometry = shapely.from_wkb(prompts["prompt_geometry"].to_numpy(zero_copy_only=False))
    bounds = shapely.bounds(geometry)
    assert (bounds[:, 0] == prompts["bbox_min_lon"].to_numpy()).all()
    assert set(prompts["prompt_kind"].to_pylist()) == {"polygon"}


def test_prompt_filters_bbox_s2_prefix_dates(lake):
    everything = build_prompts(lake, ducklake.LabelQuery())
    assert everything.num_rows == 782 + 5712
    # bbox around Massachusetts: all Boston panels plus the USPVDB farms inside it
    box = (-73.6, 41.2, -69.9, 42.9)
    in_box = build_prompts(lake, ducklake.LabelQuery(bbox=box))
    lon, lat = in_box["centroid_lon"].to_numpy(), in_box["centroid_lat"].to_numpy()
    assert ((lon >= box[0]) & (lon <= box[2]) & (lat >= box[1]) & (lat <= box[3])).all()
    datasets = in_box["dataset"].to_pylist()
    assert datasets.count("ornl_boston") == 782 and 0 < datasets.count("uspvdb") < 5712
    token = everything["s2_token_l13"][0].as_py()
    by_prefix = build_prompts(lake, ducklake.LabelQuery(s2_cell=token))
    same_cell = [t == token for t in everything["s2_token_l13"].to_pylist()]
    assert 1 <= by_prefix.num_rows == sum(same_cell)
    assert set(by_prefix["s2_token_l13"].to_pylist()) == {token}
    coarse = everything["s2_token_l10"][0].as_py()
    assert build_prompts(lake, ducklake.LabelQuery(s2_cell=coarse)).num_rows == sum(
        t == coarse for t in everything["s2_token_l10"].to_pylist()
    )
    dated = build_prompts(lake, ducklake.LabelQuery(datasets=("uspvdb",), date_from="2024-01-01", date_to="2024-06-30"))
    dates = dated["label_date"].to_pylist()
    assert dates and all(str(d) >= "2024-01-01" and str(d) <= "2024-06-30" for d in dates)


def test_unknown_dataset_is_a_clear_error(lake):
    with pytest.raises(ducklake.StoreError, match="no label table raw_nope"):
        build_prompts(lake, ducklake.LabelQuery(datasets=("nope",)))


def _env(settings) -> dict[str, str]:
    return {
        "AEGIR_LANCEDB_ROOT": settings.lancedb_root,
        "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
        "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path,
        "AEGIR_SAMPLE_DATA_DIR": str(settings.sample_data_dir),
    }


def test_cli_import_list_json_and_prompt_export(settings, tmp_path):
    runner = CliRunner()
    env = _env(settings)
    item = sample_label_set("ornl_dc")
    path = str(item.path(settings.sample_data_dir))
    result = runner.invoke(app, ["labels", "import", path, "--dataset", "ornl_dc"], env=env)
    assert result.exit_code == 0, result.output
    assert "1013 new" in result.output
    result = runner.invoke(app, ["labels", "import", path, "--dataset", "ornl_dc"], env=env)
    assert "0 new, 1013 already present" in result.output
    listed = runner.invoke(app, ["labels", "list", "--json"], env=env)
    rows = json.loads(listed.stdout)
    assert rows[0]["dataset"] == "ornl_dc" and rows[0]["table"] == "raw_ornl_dc" and rows[0]["rows"] == 1013
    assert isinstance(rows[0]["snapshot_id"], int)
    out = tmp_path / "prompts.parquet"
    result = runner.invoke(app, ["prompts", "export", "--dataset", "ornl_dc", "--out", str(out)], env=env)
    assert result.exit_code == 0, result.output
    frame = gpd.read_parquet(out)
    assert len(frame) == 1013 and frame.crs.to_epsg() == 4326


def test_cli_bad_file_exits_nonzero_with_the_file_named(settings, tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n1,2\n")
    result = CliRunner().invoke(app, ["labels", "import", str(bad), "--dataset", "x"], env=_env(settings))
    assert result.exit_code == 1 and "x.csv" in result.output and "no longitude column" in result.output


def _big_label_file(settings, tmp_path: Path, copies: int = 20) -> Path:
    """The real OSM Germany polygons repeated ``copies`` times (shifted ids): a long import to interrupt."""
    import pandas as pd

    frame = gpd.read_file(sample_label_set("osm_germany").path(settings.sample_data_dir))
    parts = [frame.assign(id=frame["id"] + k * 10_000_000) for k in range(copies)]
    path = tmp_path / "germany_x20.parquet"
    gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs=frame.crs).to_parquet(path)
    return path


def test_killed_import_leaves_last_snapshot_and_rerun_completes(settings, tmp_path):
    """SIGKILL an import while it writes its Parquet files: the lake stays at its last snapshot; a re-run completes."""
    _import(settings, "ornl_boston")
    big = _big_label_file(settings, tmp_path)
    env = {**os.environ, **_env(settings)}
    command = [sys.executable, "-m", "aegir", "labels", "import", str(big), "--dataset", "germany_x20"]
    data_dir = Path(settings.ducklake_data_path) / "main" / "raw_germany_x20"
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (data_dir.exists() and any(data_dir.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.005)
    alive = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert alive, "the import finished before its data files appeared; the test did not interrupt it"
    summary = {s["dataset"]: s["rows"] for s in list_datasets(settings)}
    assert summary == {"ornl_boston": 782}  # the uncommitted table is not visible
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    summary = {s["dataset"]: s["rows"] for s in list_datasets(settings)}
    assert summary == {"ornl_boston": 782, "germany_x20": 20 * 4458}


def test_dag_command_writes_graphviz_source(tmp_path):
    out = tmp_path / "dag.dot"
    result = CliRunner().invoke(app, ["dag", "--out", str(out)])
    assert result.exit_code == 0, result.output
    source = out.read_text()
    for node in ("label_rows", "quarantine_rows", "s2_tokens_by_level", "prompts", "label_records"):
        assert node in source
    assert "centroid_lat -> s2_tokens_by_level" in source  # label_import feeds s2_indexing


def test_dag_png_without_dot_binary_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # no `dot` on PATH, whether or not Graphviz is installed
    result = CliRunner().invoke(app, ["dag", "--out", str(tmp_path / "dag.png")])
    assert result.exit_code == 1, result.output
    assert "Graphviz `dot` program is not installed" in result.output
    assert "write a .dot file instead" in result.output
    assert not (tmp_path / "dag.png").exists()
    # the advised fallback needs no `dot`: the Graphviz source is written by the graphviz Python package alone
    source = CliRunner().invoke(app, ["dag", "--out", str(tmp_path / "dag.dot")])
    assert source.exit_code == 0, source.output
    text = (tmp_path / "dag.dot").read_text()
    assert "\ndigraph {" in text and "centroid_lat -> s2_tokens_by_level" in text


def test_dag_png_with_dot_binary_renders_a_png(tmp_path):
    import shutil as _shutil

    if _shutil.which("dot") is None:
        pytest.skip("the Graphviz `dot` program is not installed (apt-get install graphviz)")
    result = CliRunner().invoke(app, ["dag", "--out", str(tmp_path / "dag.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "dag.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # a real PNG, not an empty file

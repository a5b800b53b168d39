"""The production stack on real servers on loopback: DuckLake's catalog in PostgreSQL (Debian's ``postgresql``, run
as an unprivileged user in a temporary directory) and its DATA_PATH in an S3-compatible object store (``moto`` in
server mode). The project's own code talks to both over the network, as it would to RDS and S3 / R2, through the
CLI in real processes; credentials come only from the environment and never appear in what the CLI prints.

What this covers today: label import (exact counts, twice), prompts export, the Parquet files in the bucket, two
processes importing at once, ``training_data`` built on ``s3://`` (LanceDB reads the endpoint from
``AWS_ENDPOINT`` / ``AWS_ALLOW_HTTP``), ``dataset info``, a one-epoch ``aegir train`` streaming from it and
``aegir browse``'s server over it, latest and an earlier version. Not yet: upkeep, faults, Lance commit conflicts (issue #17).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from aegir.config import Settings

from conftest import SHARED_DATA

PG_INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
BUCKET = "aegir-lake"
ACCESS_KEY, SECRET_KEY = "aegir-test-key-0c41", "aegir-test-secret-5b1f9c7e"  # must never be printed
SAMPLE_COUNTS = {"india_solar_farms": 1363, "osm_germany": 4458, "osm_austria": 2130, "uspvdb": 5712,
                 "ornl_boston": 782, "ornl_dc": 1013}  # rows of the shared files (their own row counts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds:.0f} s")


def _as_server_user(command: list[str]) -> list[str]:
    """``command`` run as the unprivileged ``postgres`` user when the tests run as root (PostgreSQL refuses root)."""
    return ["runuser", "-u", "postgres", "--", *command] if os.getuid() == 0 else command


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on a free loopback port with an empty database ``lake``; yields the DuckLake catalog."""
    if not PG_INITDB:
        pytest.fail("PostgreSQL is not installed: `make test` installs Debian's postgresql (apt-get install "
                    "postgresql, as root)")
    bin_dir = PG_INITDB[-1].parent
    root = Path(tempfile.mkdtemp(prefix="aegir-pg-"))
    if os.getuid() == 0:
        os.chown(root, pwd.getpwnam("postgres").pw_uid, -1)
    port, data = _free_port(), root / "data"
    run = lambda *cmd: subprocess.run(_as_server_user([str(bin_dir / cmd[0]), *cmd[1:]]), check=True,  # noqa: E731
                                      capture_output=True, text=True, timeout=120)
    run("initdb", "-D", str(data), "-A", "trust", "-U", "aegir", "--no-sync")
    run("pg_ctl", "-D", str(data), "-o", f"-k {root} -h 127.0.0.1 -p {port}", "-l", str(root / "server.log"),
        "-w", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "aegir", "lake")
        yield f"postgres:dbname=lake host=127.0.0.1 port={port} user=aegir"
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def object_store() -> Iterator[dict]:
    """moto's S3 server on a free loopback port with the bucket :data:`BUCKET`; yields endpoint + boto3 client."""
    import boto3

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_port(port, proc)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": f"127.0.0.1:{port}", "client": client}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def stack_env(postgres, object_store) -> dict[str, str]:
    """The environment of a production run: the catalog, the bucket and the credentials (only here)."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        "AEGIR_DUCKLAKE_CATALOG": postgres, "AEGIR_DUCKLAKE_DATA_PATH": f"s3://{BUCKET}/lake/",
        "AEGIR_S3_ENDPOINT": object_store["endpoint"], "AEGIR_S3_REGION": "us-east-1", "AEGIR_S3_URL_STYLE": "path",
        "AEGIR_S3_USE_SSL": "false", "AEGIR_SAMPLE_DATA_DIR": str(SHARED_DATA),
        "AEGIR_LANCEDB_ROOT": f"s3://{BUCKET}/lancedb",
        "AWS_ENDPOINT": f"http://{object_store['endpoint']}", "AWS_ALLOW_HTTP": "true",  # LanceDB's object store
    }


def aegir(env: dict[str, str], *args: str) -> str:
    """Run ``aegir ARGS`` in a new process; its stdout + stderr (asserted free of the secret key)."""
    done = subprocess.run([sys.executable, "-m", "aegir", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert SECRET_KEY not in output and ACCESS_KEY not in output, "a credential was printed"
    assert done.returncode == 0, output[-3000:]
    return output


def _settings(env: dict[str, str]) -> Settings:
    from aegir.config import load_settings

    return load_settings(environ=env)


def _credentials_here(env: dict[str, str], monkeypatch) -> None:
    """This process's environment gets the run's credentials and LanceDB endpoint (as a deployment would)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT", "AWS_ALLOW_HTTP"):
        monkeypatch.setenv(name, env[name])


def _raw_counts(env: dict[str, str], monkeypatch) -> dict[str, int]:
    """Rows per ``raw_<dataset>`` table, read in this process over the network (credentials from the env)."""
    from aegir.store import ducklake

    _credentials_here(env, monkeypatch)
    settings = _settings(env)
    con = ducklake.connect(settings)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = ? "
                                            "AND table_name LIKE 'raw_%'", [settings.ducklake_alias]).fetchall()]
        return {t.removeprefix("raw_"): con.execute(f'SELECT count(*) FROM {settings.ducklake_alias}."{t}"')
                .fetchone()[0] for t in tables}
    finally:
        con.close()


def test_label_import_twice_lands_exact_counts_in_postgres_and_the_bucket(stack_env, object_store, monkeypatch):
    first = aegir(stack_env, "labels", "import-samples")
    for dataset, rows in SAMPLE_COUNTS.items():
        assert f"{dataset}: read {rows} rows" in first and f"→ {rows} new, 0 already present" in first, first
    second = aegir(stack_env, "labels", "import-samples")
    for dataset, rows in SAMPLE_COUNTS.items():
        assert f"→ 0 new, {rows} already present" in second, second
    assert _raw_counts(stack_env, monkeypatch) == SAMPLE_COUNTS
    objects = object_store["client"].list_objects_v2(Bucket=BUCKET, Prefix="lake/").get("Contents", [])
    parquet = [o["Key"] for o in objects if o["Key"].endswith(".parquet")]
    assert {key.split("/")[2] for key in parquet} >= {f"raw_{d}" for d in SAMPLE_COUNTS}, parquet  # lake/main/<table>/


def test_prompts_export_reads_the_production_lakehouse(stack_env, tmp_path):
    aegir(stack_env, "labels", "import-samples")  # idempotent: the module's first test may not have run
    out = tmp_path / "prompts.parquet"
    aegir(stack_env, "prompts", "export", "--dataset", "ornl_boston", "--dataset", "ornl_dc", "--out", str(out))
    assert pq.read_metadata(out).num_rows == SAMPLE_COUNTS["ornl_boston"] + SAMPLE_COUNTS["ornl_dc"]


def test_two_processes_importing_different_label_sets_at_once_both_land(stack_env, monkeypatch):
    """Two real processes commit to one PostgreSQL catalog at the same time; both land, with exact counts."""
    files = {"concurrent_india": SHARED_DATA / "labels/india_solar_farms_2021/"
                                               "solar_farms_india_2021_merged_simplified.geojson",
             "concurrent_dc": SHARED_DATA / "labels/ornl_rooftop_panels/dc/panels_man_dc/panels_man_dc.shp"}
    procs = [subprocess.Popen([sys.executable, "-m", "aegir", "labels", "import", str(path), "--dataset", name],
                              env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, path in files.items()]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert not any(SECRET_KEY in out for out in outputs)
    counts = _raw_counts(stack_env, monkeypatch)
    assert counts["concurrent_india"] == SAMPLE_COUNTS["india_solar_farms"]
    assert counts["concurrent_dc"] == SAMPLE_COUNTS["ornl_dc"]


def test_training_data_on_s3_trains_one_epoch_and_is_browsed(stack_env, object_store, tmp_path, monkeypatch):
    """Build ``training_data`` in the bucket from the Jiang tiles, read its summary, train one epoch streaming from
    it, build a second dataset into it, serve it with ``aegir browse`` at the latest and at the first build's
    version; the credentials appear in no output, log or checkpoint."""
    from aegir.browse import make_server

    uri = f"s3://{BUCKET}/lancedb/training_data"
    jiang = SHARED_DATA / "vhr" / "jiang_pv01"
    built = aegir(stack_env, "dataset", "build", "--images", str(jiang / "images"), "--masks", str(jiang / "masks"))
    assert f"{uri}: 60 inserted" in built, built
    keys = [o["Key"] for o in object_store["client"].list_objects_v2(Bucket=BUCKET, Prefix="lancedb/")["Contents"]]
    assert any(k.startswith("lancedb/training_data.lance/data/") and k.endswith(".lance") for k in keys), keys
    info = aegir(stack_env, "dataset", "info", "--json")
    assert '"rows": 60' in info and '"rows_with_mask": 60' in info, info
    run = tmp_path / "run"
    trained = aegir(stack_env, "train", "--dataset-uri", uri, "--out", str(run), "--max-epochs", "1",
                    "--accelerator", "cpu")
    assert (run / "best.ckpt").is_file() and "best checkpoint" in trained
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, path
    first_version = int(built.split("version ")[-1].split()[0])
    again = aegir(stack_env, "dataset", "build", "--images", str(jiang / "images"), "--masks", str(jiang / "masks"),
                  "--name", "jiang_again")
    assert f"{uri}: 60 inserted" in again, again
    _credentials_here(stack_env, monkeypatch)
    server = make_server(uri, stack_env["AEGIR_LANCEDB_ROOT"], "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = server.url.rstrip("/")
        with urllib.request.urlopen(f"{base}/api/facets", timeout=60) as response:
            facets = json.loads(response.read())
        with urllib.request.urlopen(f"{base}/api/facets?version={first_version}", timeout=60) as response:
            earlier = json.loads(response.read())  # time travel on the object store
        with urllib.request.urlopen(f"{base}/api/versions", timeout=60) as response:
            versions = json.loads(response.read())
    finally:
        server.shutdown()
        server.server_close()
    assert facets["rows"] == 120 and earlier["rows"] == 60, (facets, earlier)
    assert [d["value"] for d in earlier["datasets"]] == ["jiang_pv01"]
    assert versions["location"].startswith(f"s3://{BUCKET}/") and versions["latest"] > first_version, versions

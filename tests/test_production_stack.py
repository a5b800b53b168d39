"""The production stack on real servers on loopback: DuckLake's catalog in PostgreSQL (Debian's ``postgresql``, run
as an unprivileged user in a temporary directory) and its DATA_PATH in an S3-compatible object store (``moto`` in
server mode), which is also the LanceDB root. The project's own code talks to both over the network, as it would to
RDS and S3 / R2, through the CLI in real processes; credentials come only from the environment and never appear in
what the CLI prints or writes. LanceDB finds the endpoint through the same ``AEGIR_S3_*`` settings as DuckLake.

Covered: label import (exact counts, twice), prompts export, two processes importing at once, the imagery catalog
(twice), a grid plan worked by two worker processes and region inference writing ``predicted_pv``,
``training_data`` built on ``s3://`` (two builds at once, too), ``dataset info``, a one-epoch ``aegir train``
streaming from it, ``aegir browse`` over it (latest and an earlier version), upkeep (``dataset optimize`` keeping the
trained version, a killed Ray driver's fragments removed, ``lake maintain``), and faults: the object store going
away mid-build, the catalog restarting.
"""

from __future__ import annotations

import contextlib
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

import lance
import pyarrow.parquet as pq
import pytest

from aegir.config import Settings

from conftest import SHARED_DATA

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"

PG_INITDB = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
BUCKET = "aegir-lake"
ACCESS_KEY, SECRET_KEY = "aegir-test-key-0c41", "aegir-test-secret-5b1f9c7e"  # must never be printed
SAMPLE_COUNTS = {"india_solar_farms": 1363, "osm_germany": 4458, "osm_austria": 2130, "uspvdb": 5712,
                 "ornl_boston": 782, "ornl_dc": 1013}  # rows of the shared files (their own row counts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, log, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read().decode(errors='replace')}")
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
    """A PostgreSQL server on a free loopback port with an empty database ``lake``; yields the DuckLake catalog and
    a function that restarts the server (same port and data)."""
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
        yield {"catalog": f"postgres:dbname=lake host=127.0.0.1 port={port} user=aegir",
               "restart": lambda: run("pg_ctl", "-D", str(data), "-m", "fast", "-l", str(root / "server.log"), "-w",
                                      "restart")}  # -l: the server must not hold our captured stdout open
    finally:
        run("pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def object_store() -> Iterator[dict]:
    """moto's S3 server on a free loopback port with the bucket :data:`BUCKET`; yields endpoint + boto3 client."""
    import boto3

    port = _free_port()
    log = tempfile.TemporaryFile()  # a file, not a pipe: moto logs every request, and a full pipe would block it
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, proc, log)
        client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": f"127.0.0.1:{port}", "port": port, "client": client}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def stack_env(postgres, object_store) -> dict[str, str]:
    """The environment of a production run: the catalog, the bucket and the credentials (only here)."""
    return {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
        "AEGIR_DUCKLAKE_CATALOG": postgres["catalog"], "AEGIR_DUCKLAKE_DATA_PATH": f"s3://{BUCKET}/lake/",
        "AEGIR_S3_ENDPOINT": object_store["endpoint"], "AEGIR_S3_REGION": "us-east-1", "AEGIR_S3_URL_STYLE": "path",
        "AEGIR_S3_USE_SSL": "false", "AEGIR_SAMPLE_DATA_DIR": str(SHARED_DATA),
        "AEGIR_LANCEDB_ROOT": f"s3://{BUCKET}/lancedb", "PYTHONPATH": str(Path(__file__).parent),
    }


def _run_aegir(env: dict[str, str], args: tuple[str, ...]) -> subprocess.CompletedProcess:
    """``aegir ARGS`` in a new process; fails on a non-zero exit or a credential in stdout or stderr."""
    done = subprocess.run([sys.executable, "-m", "aegir", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    output = done.stdout + done.stderr
    assert SECRET_KEY not in output and ACCESS_KEY not in output, "a credential was printed"
    assert done.returncode == 0, output[-3000:]
    return done


def aegir(env: dict[str, str], *args: str) -> str:
    """Run ``aegir ARGS`` in a new process; its stdout + stderr (asserted free of the credentials)."""
    done = _run_aegir(env, args)
    return done.stdout + done.stderr


def aegir_json(env: dict[str, str], *args: str) -> dict:
    """Run ``aegir ARGS --json``; the JSON object it printed last on stdout."""
    done = _run_aegir(env, (*args, "--json"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def _settings(env: dict[str, str]) -> Settings:
    from aegir.config import load_settings

    return load_settings(environ=env)


def _credentials_here(env: dict[str, str], monkeypatch) -> None:
    """This process's environment gets the run's credentials and LanceDB endpoint (as a deployment would)."""
    from aegir.store.lance_io import object_store_env

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(name, env[name])
    for name, value in object_store_env(_settings(env)).items():
        monkeypatch.setenv(name, value)


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


def test_the_imagery_catalog_registers_into_the_production_lakehouse_once(stack_env):
    """``aegir imagery register`` writes the Jiang footprints (with their truth masks) to the catalog in
    PostgreSQL + the bucket: 60 the first time, 0 new the second; ``imagery list`` reads them back."""
    first = aegir_json(stack_env, "imagery", "register", str(JIANG / "images"), "--dataset", "jiang_pv01",
                       "--truth-masks", str(JIANG / "masks"))
    again = aegir_json(stack_env, "imagery", "register", str(JIANG / "images"), "--dataset", "jiang_pv01",
                       "--truth-masks", str(JIANG / "masks"))
    assert (first["inserted"], again["inserted"], again["already_present"]) == (60, 0, 60), (first, again)
    listed = aegir_json(stack_env, "imagery", "list", "--dataset", "jiang_pv01")
    assert len(listed) == 60 and all(row["dataset"] == "jiang_pv01" for row in listed)


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


@pytest.fixture(scope="module")
def s3_trained(stack_env, tmp_path_factory) -> dict:
    """``training_data`` built in the bucket from the Jiang tiles and a one-epoch ``aegir train`` streaming from it:
    the table uri, the build's output and version, the run folder."""
    uri = f"s3://{BUCKET}/lancedb/training_data"
    built = aegir(stack_env, "dataset", "build", "--images", str(JIANG / "images"), "--masks", str(JIANG / "masks"))
    run = tmp_path_factory.mktemp("s3_train") / "run"
    trained = aegir(stack_env, "train", "--dataset-uri", uri, "--out", str(run), "--max-epochs", "1",
                    "--accelerator", "cpu")
    return {"uri": uri, "built": built, "version": int(built.split("version ")[-1].split()[0]), "run": run,
            "trained": trained}


def test_training_data_on_s3_trains_one_epoch_and_is_browsed(s3_trained, stack_env, object_store, monkeypatch):
    """The build lands in the bucket as ONE data version after the table's own; ``dataset info`` reads it; a
    one-epoch run trained from it with no credential in its folder; a second build into it; ``aegir browse``
    serves it at the latest and at the first build's version."""
    from aegir.browse import make_server

    uri, built, run, first_version = s3_trained["uri"], s3_trained["built"], s3_trained["run"], s3_trained["version"]
    assert f"{uri}: 60 inserted" in built, built
    keys = [o["Key"] for o in object_store["client"].list_objects_v2(Bucket=BUCKET, Prefix="lancedb/")["Contents"]]
    assert any(k.startswith("lancedb/training_data.lance/data/") and k.endswith(".lance") for k in keys), keys
    info = aegir_json(stack_env, "dataset", "info")
    assert info["rows"] == info["rows_with_mask"] == 60, info
    assert (run / "best.ckpt").is_file() and "best checkpoint" in s3_trained["trained"]
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET_KEY.encode() not in data and ACCESS_KEY.encode() not in data, path
    again = aegir(stack_env, "dataset", "build", "--images", str(JIANG / "images"), "--masks", str(JIANG / "masks"),
                  "--name", "jiang_again")
    assert f"{uri}: 60 inserted" in again and f"version {first_version + 1}" in again, again  # one version a build
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


def _lance_objects(client, prefix: str) -> set[str]:
    keys, token = set(), None
    while True:
        page = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix, **({"ContinuationToken": token} if token else {}))
        keys |= {o["Key"] for o in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _write_fragments_then_die(env: dict[str, str], dataset_uri: str) -> None:
    """A Ray build's driver killed between its workers' fragment writes and its commit: a process writes the
    Jiang rows as fragments into the table's data folder, then SIGKILLs itself before committing."""
    code = f"""
import os, signal, lance
from aegir.store import lance_fragments
rows = lance.dataset({dataset_uri!r}).to_table(limit=20)
print(len(lance_fragments.write_fragments(rows, {dataset_uri!r})), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""
    from aegir.store.lance_io import object_store_env

    done = subprocess.run([sys.executable, "-c", code], env=env | object_store_env(_settings(env)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9 and done.stdout.strip() == "1", done.stdout + done.stderr[-2000:]


def test_optimize_keeps_the_trained_version_and_removes_old_versions_and_orphans(s3_trained, stack_env,
                                                                                 object_store, monkeypatch):
    """``aegir dataset optimize`` on the S3 table: the version the checkpoint was trained on is tagged and stays
    readable, every other old version goes, fragments are compacted, the rows are the same; with
    ``--remove-orphans`` the fragments of a killed writer are deleted from the bucket."""
    client = object_store["client"]
    aegir(stack_env, "dataset", "build", "--images", str(JIANG / "images"), "--masks", str(JIANG / "masks"),
          "--name", "jiang_upkeep")  # a fragment of its own, so there is something to compact
    before = aegir_json(stack_env, "dataset", "info")
    dataset_uri = f"s3://{BUCKET}/lancedb/training_data.lance"
    data_before = {k for k in _lance_objects(client, "lancedb/training_data.lance/data/") if k.endswith(".lance")}
    _write_fragments_then_die(stack_env, dataset_uri)
    orphans = {k for k in _lance_objects(client, "lancedb/training_data.lance/data/")
               if k.endswith(".lance")} - data_before
    assert len(orphans) == 1, orphans

    report = aegir_json(stack_env, "dataset", "optimize", "--older-than-days", "0", "--keep-from",
                        str(s3_trained["run"]), "--remove-orphans")
    assert report["rows"] == before["rows"] >= 120 and report["kept_versions"] == [s3_trained["version"]]
    assert report["fragments_before"] >= 2 and report["fragments_after"] == 1, report
    assert report["versions_after"] == 2 and report["versions_removed"] >= 2, report  # the latest + the kept one
    assert not orphans & _lance_objects(client, "lancedb/training_data.lance/data/")  # the killed writer's files
    after = aegir_json(stack_env, "dataset", "info")
    assert after["rows"] == before["rows"] and after["rows_with_mask"] == before["rows_with_mask"]
    _credentials_here(stack_env, monkeypatch)
    kept = lance.dataset(dataset_uri, version=s3_trained["version"]).to_table()  # every byte of it still there
    assert kept.num_rows == 60 and kept["truth_mask"].null_count == 0
    with pytest.raises((ValueError, OSError)):
        lance.dataset(dataset_uri, version=s3_trained["version"] + 1)  # an untagged old version is gone


def test_two_builds_into_one_s3_table_at_once_lose_no_rows(stack_env):
    """Two ``aegir dataset build`` processes commit to one Lance table on S3 at the same time: both land."""
    uri = f"s3://{BUCKET}/concurrent/training_data"
    procs = [subprocess.Popen([sys.executable, "-m", "aegir", "dataset", "build", "--images", str(JIANG / "images"),
                               "--masks", str(JIANG / "masks"), "--uri", uri, "--name", name],
                              env=stack_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("writer_a", "writer_b")]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    assert all(f"{uri}: 60 inserted" in out for out in outputs), outputs
    info = aegir_json(stack_env, "dataset", "info", "--uri", uri)
    assert info["rows"] == 120 and info["rows_with_mask"] == 120, info


def test_two_writers_indexing_one_s3_table_at_the_same_moment_both_finish(stack_env, monkeypatch):
    """Two processes create the missing BTREE indexes of one table at the same instant (two builds into a new
    table do): Lance rejects the later index commit; the loser sees the winner's index and goes on."""
    import lancedb
    import pyarrow as pa

    _credentials_here(stack_env, monkeypatch)
    root = f"s3://{BUCKET}/index_race"
    lancedb.connect(root).create_table("t", data=pa.table({"uuid": [f"u{i}" for i in range(500)], "d": ["x"] * 500}))
    code = """
import sys, time, lancedb
from aegir.store.lance_io import ensure_scalar_indexes
table = lancedb.connect(sys.argv[1]).open_table("t")
while time.time() < float(sys.argv[2]):
    pass
print(ensure_scalar_indexes(table, ["uuid", "d"], missing_only=True))
"""
    start = str(time.time() + 5)  # both processes past their imports, then one instant
    env = stack_env | {name: os.environ[name] for name in ("AWS_ENDPOINT", "AWS_ALLOW_HTTP")}
    procs = [subprocess.Popen([sys.executable, "-c", code, root, start], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    indexed = sorted(tuple(idx.columns) for idx in lancedb.connect(root).open_table("t").list_indices())
    assert indexed == [("d",), ("uuid",)], (indexed, outputs)


RECORDS_ENV = "STACK_TEST_CELL_RECORDS"
AUSTIN = SHARED_DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"


def record_cell(token: str) -> str:
    """The per-cell work of the plan test: a 'done <token> <pid>' line in $STACK_TEST_CELL_RECORDS."""
    time.sleep(0.2)
    with open(os.environ[RECORDS_ENV], "a") as out:
        out.write(f"done {token} {os.getpid()}\n")
    return "recorded"


def test_a_plan_worked_by_two_processes_and_region_inference_on_the_stack(s3_trained, stack_env, tmp_path,
                                                                         monkeypatch):
    """A grid plan stored in the PostgreSQL catalog, worked by two worker processes that lease cells from it (no
    cell twice); then ``aegir infer region`` with the S3-trained checkpoint writes ``predicted_pv`` and
    ``installations`` into the lakehouse (PostgreSQL + bucket), as many rows as it reports."""
    from aegir.store import ducklake

    records = tmp_path / "records.txt"
    env = stack_env | {RECORDS_ENV: str(records)}
    made = aegir(env, "plan", "--aoi", "-71.10,42.30,-71.06,42.33", "--level", "13", "--plan-id", "stack")
    assert "level-13 S2 cells" in made, made
    run = aegir_json(env, "plan", "work", "--plan-id", "stack", "--work", f"{__name__}:record_cell", "--workers",
                     "2", "--lease-seconds", "30")
    lines = [line.split() for line in records.read_text().splitlines()]
    tokens = [token for _, token, _ in lines]
    assert run["finished"] and len(run["reports"]) == 2 and len(tokens) == len(set(tokens)) >= 8, run
    assert len({pid for _, _, pid in lines}) == 2  # both workers took cells
    status = aegir_json(env, "plan", "status", "--plan-id", "stack")
    assert status["done"] == len(tokens) and status["pending"] == 0, status

    out = tmp_path / "region"
    region = aegir_json(env, "infer", "region", "--tiles", str(AUSTIN), "--aoi", "-97.7036,30.3004,-97.7026,30.3012",
                        "--plan-level", "16", "--checkpoint", str(s3_trained["run"] / "best.ckpt"), "--out",
                        str(out), "--device", "cpu")
    assert region["failed"] == [] and len(region["processed"]) == region["cells"] >= 1, region
    _credentials_here(stack_env, monkeypatch)
    settings = _settings(stack_env)
    con = ducklake.connect(settings)
    try:
        stored = ducklake.read_predictions(con, settings, region["plan_id"]).num_rows
        installations = ducklake.read_installations(con, settings, region["plan_id"]).num_rows
    finally:
        con.close()
    assert stored == region["detections"] and installations == region["installations"], region
    assert (out / "detections.parquet").is_file() and (out / "installations.parquet").is_file()


def test_lake_maintain_expires_snapshots_and_deletes_orphaned_files_in_the_bucket(stack_env, object_store,
                                                                                 monkeypatch):
    """``aegir lake maintain`` on PostgreSQL + S3: a dry run changes nothing; the real run leaves one snapshot,
    deletes a Parquet file no snapshot references, and every label table keeps its rows."""
    aegir(stack_env, "labels", "import-samples")
    counts = _raw_counts(stack_env, monkeypatch)
    client = object_store["client"]
    orphan = "lake/main/raw_ornl_dc/ducklake-orphan-of-a-killed-writer.parquet"
    client.put_object(Bucket=BUCKET, Key=orphan, Body=pq_bytes())
    dry = aegir_json(stack_env, "lake", "maintain", "--older-than-days", "0", "--dry-run")
    assert dry["snapshots_after"] == dry["snapshots_before"] > 1 and dry["expired_snapshots"]
    assert any(path.endswith(orphan) for path in dry["orphaned_files"]), dry
    done = aegir_json(stack_env, "lake", "maintain", "--older-than-days", "0")
    assert done["snapshots_after"] == 1 and any(path.endswith(orphan) for path in done["orphaned_files"]), done
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="lake/main/raw_ornl_dc/")["Contents"]}
    assert orphan not in keys and keys
    assert _raw_counts(stack_env, monkeypatch) == counts


def pq_bytes() -> bytes:
    """A small, valid Parquet file."""
    import io

    import pyarrow as pa

    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": [1, 2, 3]}), buffer)
    return buffer.getvalue()


class _Proxy:
    """A TCP proxy on loopback to the object store that can be stopped (the store goes away: connections drop,
    new ones are refused) and started again on the same port, the store's data intact behind it."""

    def __init__(self, target_port: int) -> None:
        self.target_port, self.port, self._server, self._sockets = target_port, 0, None, []

    def start(self) -> "_Proxy":
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self.port, self._server = server.getsockname()[1], server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._sockets = []

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_the_object_store_going_away_mid_build_is_a_clear_error_and_a_rerun_completes(stack_env, object_store):
    """The bucket becomes unreachable while ``aegir dataset build`` runs (after the table exists, before its rows
    are committed): the build fails with a one-line error naming the table and its version, the table is still at
    that version, and a re-run once the store is back commits all 60 rows."""
    proxy = _Proxy(object_store["port"]).start()
    env = stack_env | {"AEGIR_S3_ENDPOINT": f"127.0.0.1:{proxy.port}", "AEGIR_LANCEDB_ROOT": f"s3://{BUCKET}/faults"}
    command = [sys.executable, "-m", "aegir", "dataset", "build", "--images", str(JIANG / "images"), "--masks",
               str(JIANG / "masks"), "--encoding", "png"]
    build = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client, deadline = object_store["client"], time.monotonic() + 120
    while time.monotonic() < deadline and build.poll() is None:
        if client.list_objects_v2(Bucket=BUCKET, Prefix="faults/training_data.lance/_versions/").get("KeyCount"):
            break  # the table exists: its rows are being read and encoded
        time.sleep(0.05)
    proxy.stop()
    output = build.communicate(timeout=600)[0]
    assert build.returncode == 1 and "Traceback" not in output, output[-3000:]
    assert "faults/training_data" in output and "stays at version" in output and SECRET_KEY not in output, output
    proxy.start()  # the store is back, on the same port
    rerun = aegir(env, "dataset", "build", "--images", str(JIANG / "images"), "--masks", str(JIANG / "masks"),
                  "--encoding", "png")
    assert "60 inserted" in rerun, rerun
    info = aegir_json(env, "dataset", "info")
    assert info["rows"] == info["rows_with_mask"] == 60
    proxy.stop()


def test_a_restarted_postgres_catalog_is_reconnected(stack_env, postgres, monkeypatch):
    """The catalog server restarts between and during work: the next command reconnects, and a long-lived ledger
    session (one per region worker) attaches again for its next transaction."""
    from aegir.store import ducklake

    before = aegir(stack_env, "labels", "list")
    _credentials_here(stack_env, monkeypatch)
    settings = _settings(stack_env)
    snapshots = f"SELECT count(*) FROM {settings.ducklake_alias}.snapshots()"
    session = ducklake.LedgerSession(settings)
    try:
        with session.attached() as con:
            first = con.execute(snapshots).fetchone()[0]
        postgres["restart"]()
        with session.attached() as con:  # the same session after the restart
            again = con.execute(snapshots).fetchone()[0]
    finally:
        session.close()
    assert again == first >= 1
    assert aegir(stack_env, "labels", "list") == before


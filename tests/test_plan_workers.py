"""Leased workers on a grid plan: exclusive claims, expiry, owner-only completion, and real worker processes of
which one is SIGKILLed mid-lease (its cells come back only after the lease, every cell is worked to done once)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import shapely
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines import plan_workers
from aegir.pipelines.plan import plan_national
from aegir.store import ducklake

AOI = shapely.box(-71.10, 42.30, -71.06, 42.33)  # lon/lat, Boston: a dozen level-13 cells
RECORDS_ENV = "PLAN_TEST_CELL_RECORDS"  # not AEGIR_*: those are settings
WORK_SECONDS = 0.3


def record_cell(token: str) -> str:
    """The per-cell work of these tests: 'start' and 'done' lines (token, pid, time) in $PLAN_TEST_CELL_RECORDS."""
    path = os.environ[RECORDS_ENV]
    with open(path, "a") as out:
        out.write(f"start {token} {os.getpid()} {time.time():.6f}\n")
    time.sleep(WORK_SECONDS)
    with open(path, "a") as out:
        out.write(f"done {token} {os.getpid()} {time.time():.6f}\n")
    return f"recorded by {os.getpid()}"


def _records(path: Path) -> list[tuple[str, str, int, float]]:
    lines = path.read_text().splitlines() if path.exists() else []
    return [(kind, token, int(pid), float(at)) for kind, token, pid, at in (line.split() for line in lines)]


@pytest.fixture()
def plan(settings) -> tuple:
    report = plan_national(settings, "work", AOI, "Boston box", plan_level=13)
    assert 8 <= report.cells <= 40
    return settings, report.cells


def _ledger(settings) -> list[dict]:
    session = ducklake.LedgerSession(settings)
    try:
        with session.attached() as con:
            return ducklake.read_grid_plan(con, settings, "work").to_pylist()
    finally:
        session.close()


def test_claims_are_exclusive_expire_and_only_the_owner_completes(plan):
    settings, cells = plan
    session = ducklake.LedgerSession(settings)
    try:
        with session.attached() as con:
            ducklake.prepare_leases(con, settings, "work")
            first = ducklake.claim_cells(con, settings, "work", "a", 3, lease_seconds=1.0)["cell_token"].to_pylist()
            second = ducklake.claim_cells(con, settings, "work", "b", 3, lease_seconds=60)["cell_token"].to_pylist()
            assert len(first) == len(second) == 3 and not set(first) & set(second)
            assert not ducklake.complete_cell(con, settings, "work", first[0], "b")  # not b's lease
            assert ducklake.complete_cell(con, settings, "work", first[0], "a", "done", "ok")
            assert not ducklake.complete_cell(con, settings, "work", first[0], "a")  # already done
            assert ducklake.renew_lease(con, settings, "work", "a", 1.0) == first[1:]
        time.sleep(1.2)  # a's two other leases expire
        with session.attached() as con:
            third = ducklake.claim_cells(con, settings, "work", "c", cells, lease_seconds=60)
            assert set(first[1:]) <= set(third["cell_token"].to_pylist())
            assert not set(second) & set(third["cell_token"].to_pylist())  # b's leases still run
            assert not ducklake.complete_cell(con, settings, "work", first[1], "a")  # a lost it to c
            assert ducklake.renew_lease(con, settings, "work", "a", 1.0) == []
            with pytest.raises(ValueError, match="leased cell ends"):
                ducklake.complete_cell(con, settings, "work", first[1], "c", "pending")
            progress = ducklake.plan_progress(con, settings, "work")
        assert progress["done"] == 1 and progress["running"] == cells - 1 and progress["next_expiry_s"] > 50
        rows = {r["cell_token"]: r for r in _ledger(settings)}
        assert rows[first[1]]["lease_owner"] == "c" and rows[first[1]]["attempts"] == 2
        assert rows[first[0]]["message"] == "ok" and rows[first[0]]["lease_owner"] == "a"
    finally:
        session.close()


def test_an_expired_cell_tried_too_often_fails(plan):
    settings, _ = plan
    session = ducklake.LedgerSession(settings)
    try:
        for _ in range(2):
            with session.attached() as con:
                (token,) = ducklake.claim_cells(con, settings, "work", "crashy", 1, 0.05, max_attempts=2)[
                    "cell_token"].to_pylist()
            time.sleep(0.1)
        with session.attached() as con:
            after = ducklake.claim_cells(con, settings, "work", "next", 1, 60, max_attempts=2)
    finally:
        session.close()
    rows = {r["cell_token"]: r for r in _ledger(settings)}
    assert rows[token]["status"] == "failed" and "lease expired after 2 attempts" in rows[token]["message"]
    assert after["cell_token"].to_pylist() != [token]


def test_a_killed_worker_s_cells_return_only_after_its_lease(plan, tmp_path, monkeypatch):
    settings, cells = plan
    records = tmp_path / "records.txt"
    monkeypatch.setenv(RECORDS_ENV, str(records))
    options = plan_workers.WorkerOptions(batch=2, lease_seconds=6.0)
    result: dict = {}
    pool = threading.Thread(target=lambda: result.update(run=plan_workers.run_local_workers(
        settings, "work", f"{__name__}:record_cell", 3, options)))
    started = time.monotonic()
    pool.start()
    victim = _wait_for_a_worker_mid_cell(records, deadline=started + 120)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.time()
    held = {r["cell_token"]: r["lease_expires_at"].timestamp() for r in _ledger(settings)
            if r["status"] == "running" and f":{victim}:" in (r["lease_owner"] or "")}
    pool.join(timeout=180)
    assert not pool.is_alive()
    run = result["run"]
    assert len(run.died) == 1 and f"pid {victim}" in run.died[0] and "exit code -9" in run.died[0]
    assert run.finished and run.progress["done"] == cells and len(run.reports) == 2

    assert held and all(expiry > killed_at for expiry in held.values())  # it died holding live leases
    events = _records(records)
    done = Counter(token for kind, token, _, _ in events if kind == "done")
    assert set(done) == {r["cell_token"] for r in _ledger(settings)} and set(done.values()) == {1}  # each once
    for token, expiry in held.items():  # taken over only once the lease had expired
        restarts = [at for kind, t, pid, at in events if kind == "start" and t == token and pid != victim]
        assert len(restarts) == 1 and restarts[0] >= expiry
    rows = {r["cell_token"]: r for r in _ledger(settings)}
    assert all(rows[t]["attempts"] == 2 and f":{victim}:" not in rows[t]["lease_owner"] for t in held)
    victim_done = sum(1 for kind, _, pid, _ in events if kind == "done" and pid == victim)
    assert sum(len(r.done) for r in run.reports) == cells - victim_done and not any(r.lost for r in run.reports)
    assert time.monotonic() - started < 120


def _wait_for_a_worker_mid_cell(records: Path, deadline: float) -> int:
    """The pid of a worker that finished a cell and is now inside another one (started, not done)."""
    while time.monotonic() < deadline:
        events = _records(records)
        finished = {pid for kind, _, pid, _ in events if kind == "done"}
        open_cells = Counter((t, pid) for kind, t, pid, _ in events if kind == "start")
        open_cells.subtract(Counter((t, pid) for kind, t, pid, _ in events if kind == "done"))
        for (_, pid), count in open_cells.items():
            if count > 0 and pid in finished:
                return pid
        time.sleep(0.02)
    raise AssertionError(f"no worker was caught mid-cell: {records.read_text() if records.exists() else 'no records'}")


def test_plan_cli_creates_works_and_reports(settings, tmp_path, monkeypatch):
    config = tmp_path / "aegir.toml"
    config.write_text(f'ducklake_catalog = "{settings.ducklake_catalog}"\n'
                      f'ducklake_data_path = "{settings.ducklake_data_path}"\n')
    runner = CliRunner()
    bench = tmp_path / "inference.jsonl"
    bench.write_text('{"tiles": 1, "chips_per_s": 4.0}\n{"tiles": 4, "chips_per_s": 8.0}\n')
    bbox = ",".join(str(v) for v in AOI.bounds)
    made = runner.invoke(app, ["--config", str(config), "plan", "--aoi", bbox, "--level", "12", "--plan-id", "cli",
                               "--bench-json", str(bench), "--gsd-m", "0.5"])
    assert made.exit_code == 0, made.output
    assert "level-12 S2 cells" in made.output and "estimate on paper" in made.output and "8 chips/s" in made.output
    wrong = runner.invoke(app, ["--config", str(config), "plan", "--aoi", "Germny"])
    assert wrong.exit_code == 1 and "did you mean Germany" in wrong.output
    monkeypatch.setenv(RECORDS_ENV, str(tmp_path / "cli_records.txt"))
    worked = runner.invoke(app, ["--config", str(config), "plan", "work", "--plan-id", "cli", "--work",
                                 f"{__name__}:record_cell", "--workers", "1", "--lease-seconds", "10"])
    assert worked.exit_code == 0, worked.output
    status = runner.invoke(app, ["--config", str(config), "plan", "status", "--plan-id", "cli", "--json"])
    cells = sum(1 for kind, *_ in _records(tmp_path / "cli_records.txt") if kind == "done")
    assert status.exit_code == 0 and f'"done": {cells}' in status.output and '"pending": 0' in status.output
    missing = runner.invoke(app, ["--config", str(config), "plan", "work", "--plan-id", "nope", "--work",
                                  f"{__name__}:record_cell"])
    assert missing.exit_code == 1 and "no grid plan 'nope'" in missing.output


def test_ray_tasks_work_a_plan_to_done(settings, tmp_path):
    ray = pytest.importorskip("ray")
    plan_national(settings, "ray", AOI, "Boston box", plan_level=12)
    records = tmp_path / "ray_records.txt"
    env = {RECORDS_ENV: str(records), "PYTHONPATH": str(Path(__file__).parent)}
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False,
             runtime_env={"env_vars": env})
    try:
        run = plan_workers.run_ray_workers(settings, "ray", f"{__name__}:record_cell", 2, None,
                                           plan_workers.WorkerOptions(batch=1, lease_seconds=10))
    finally:
        ray.shutdown()
    done = Counter(token for kind, token, _, _ in _records(records) if kind == "done")
    assert run.finished and not run.died and len(run.reports) == 2
    assert set(done.values()) == {1} and len(done) == run.progress["done"] == sum(len(r.done) for r in run.reports)


def test_a_plan_stored_before_leases_gets_lease_columns(plan):
    settings, cells = plan
    con = ducklake.connect(settings)
    try:
        for column in ("lease_owner", "lease_expires_at"):  # the table as plans were stored before leases
            con.execute(f'ALTER TABLE {settings.ducklake_alias}.grid_plan DROP COLUMN "{column}"')
        assert ducklake.plan_progress(con, settings, "work")["pending"] == cells  # status works without them
        with pytest.raises(ducklake.StoreError, match="predates leases"):
            ducklake.claim_cells(con, settings, "work", "w", 1, 10)
        ducklake.prepare_leases(con, settings, "work")
        assert ducklake.claim_cells(con, settings, "work", "w", 2, 10).num_rows == 2
        with pytest.raises(ducklake.StoreError, match="no grid plan 'other'"):
            ducklake.prepare_leases(con, settings, "other")
    finally:
        con.close()

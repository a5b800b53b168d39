"""Grid plans: a resumable table (``grid_plan``) of S2 work cells per plan id, each with its ranking evidence
and a status ledger (pending → running → done / failed / no_imagery, with attempts and a message), plus leases
for many workers on one plan (``lease_owner``, ``lease_expires_at``: :func:`claim_cells`, :func:`renew_lease`,
:func:`complete_cell`, one :class:`LedgerSession` per worker process; the concurrency rules are below)."""

from __future__ import annotations

import contextlib
import fcntl
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import duckdb
import pyarrow as pa
import pyarrow.compute

from aegir.config import Settings
from aegir.store import sql
from aegir.store.ducklake.connection import (
    add_missing_columns,
    attach_statement,
    extension_path,
    needed_extensions,
    qualified,
    retry_on_conflict,
    rollback,
    s3_secret_statement,
    table_columns,
    table_exists,
    transaction_with,
)
from aegir.store.errors import StoreError

T = TypeVar("T")

PLAN_TABLE = "grid_plan"
PLAN_STATUSES = ("pending", "running", "done", "failed", "no_imagery")
PLAN_RANKING_COLUMNS = ("rank", "priority", "label_count", "context_label_count", "builtup", "prior_detections",
                        "boost")


LEASE_COLUMNS_SQL = "CAST(NULL AS VARCHAR) AS lease_owner, CAST(NULL AS TIMESTAMPTZ) AS lease_expires_at"


def _add_lease_columns(con: duckdb.DuckDBPyConnection, settings: Settings) -> None:
    """Plans stored before leases existed get ``lease_owner`` / ``lease_expires_at`` (NULL)."""
    existing = table_columns(con, settings, PLAN_TABLE)
    for name, dtype in (("lease_owner", "VARCHAR"), ("lease_expires_at", "TIMESTAMPTZ")):
        if name not in existing:
            con.execute(f'ALTER TABLE {qualified(settings, PLAN_TABLE)} ADD COLUMN "{name}" {dtype}')


def _check_status(status: str) -> None:
    if status not in PLAN_STATUSES:
        raise ValueError(f"status {status!r} is not one of {', '.join(PLAN_STATUSES)}")


def write_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Store ``plan`` under ``plan_id`` in one transaction; cells already planned keep their status. Returns new cells."""
    if not plan_id or not plan_id.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"plan id {plan_id!r} must be letters, digits, '-' and '_'")
    target = qualified(settings, PLAN_TABLE)
    with transaction_with(con, "aegir_incoming_plan", plan):
        view = ("SELECT ? AS plan_id, *, 0 AS attempts, CAST(NULL AS VARCHAR) AS message, now() AS updated_at, "
                f"{LEASE_COLUMNS_SQL} FROM aegir_incoming_plan")
        if not table_exists(con, settings, PLAN_TABLE):
            con.execute(f"CREATE TABLE {target} AS {view}", [plan_id])
            added = plan.num_rows
        else:
            add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_plan")  # e.g. ``boost`` on old plans
            _add_lease_columns(con, settings)
            before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
            con.execute(
                f"INSERT INTO {target} BY NAME SELECT * FROM ({view}) incoming "
                f"WHERE NOT EXISTS (SELECT 1 FROM {target} t WHERE t.plan_id = incoming.plan_id "
                f"AND t.cell_token = incoming.cell_token)",
                [plan_id],
            )
            added = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before
    return added


def rerank_grid_plan(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, plan: pa.Table) -> int:
    """Give the stored cells of ``plan_id`` the ranking columns (rank, priority, evidence, boost) of a freshly
    computed ``plan``, in one transaction; status, attempts and messages are kept. Returns the cells updated."""
    target = qualified(settings, PLAN_TABLE)
    columns = [c for c in PLAN_RANKING_COLUMNS if c in plan.column_names]
    incoming = plan.select(["cell_token", *columns])
    with transaction_with(con, "aegir_incoming_ranks", incoming):
        add_missing_columns(con, settings, PLAN_TABLE, "aegir_incoming_ranks")
        sets = ", ".join(f'"{c}" = i."{c}"' for c in columns)
        con.execute(f"UPDATE {target} SET {sets}, updated_at = now() FROM aegir_incoming_ranks i "
                    f"WHERE {target}.plan_id = ? AND {target}.cell_token = i.cell_token", [plan_id])
        return con.execute(f"SELECT count(*) FROM {target} t JOIN aegir_incoming_ranks i USING (cell_token) "
                           f"WHERE t.plan_id = ?", [plan_id]).fetchone()[0]


def read_grid_plan(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, statuses: Sequence[str] | None = None
) -> pa.Table:
    """The plan's cells in priority order, optionally only those with one of ``statuses``."""
    if not table_exists(con, settings, PLAN_TABLE):
        raise StoreError(f"no grid plan {plan_id!r}: the lakehouse has no {PLAN_TABLE} table yet")
    clause, params = "plan_id = ?", [plan_id]
    if statuses:
        clause += f" AND status IN ({', '.join('?' for _ in statuses)})"
        params += list(statuses)
    return con.execute(
        f"SELECT * FROM {qualified(settings, PLAN_TABLE)} WHERE {clause} ORDER BY rank", params
    ).to_arrow_table()


def set_cell_status(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, cell_token: str, status: str,
    message: str | None = None,
) -> None:
    """Record a cell's new status (and why, for failures); ``running`` counts an attempt. One snapshot."""
    _check_status(status)
    target = qualified(settings, PLAN_TABLE)
    exists = con.execute(
        f"SELECT count(*) FROM {target} WHERE plan_id = ? AND cell_token = ?", [plan_id, cell_token]
    ).fetchone()[0]
    if not exists:
        raise StoreError(f"grid plan {plan_id!r} has no cell {cell_token!r}")
    con.execute(
        f"UPDATE {target} SET status = ?, message = ?, updated_at = now(), "
        f"attempts = attempts + CASE WHEN ? = 'running' THEN 1 ELSE 0 END WHERE plan_id = ? AND cell_token = ?",
        [status, message, status, plan_id, cell_token],
    )


def set_plan_status(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, status: str,
                    message: str | None = None) -> None:
    """Give every cell of a plan ``status`` (and why) in one statement, e.g. ``no_imagery`` for an empty AOI."""
    _check_status(status)
    con.execute(
        f"UPDATE {qualified(settings, PLAN_TABLE)} SET status = ?, message = ?, updated_at = now() WHERE plan_id = ?",
        [status, message, plan_id],
    )


# ---- leases: many workers on one plan ----------------------------------------------------------------------------
#
# A worker claims cells (pending ones, and running ones whose lease expired) with a lease; it renews the lease while
# it works and completes each cell as its lease owner. A cell has at most one owner at a time: every claim, renewal
# and completion is ONE DuckLake transaction that reads and writes the owner, and such transactions never overlap:
#
# * local DuckDB-file catalog: one process at a time may attach it, so every ledger transaction runs inside
#   :meth:`LedgerSession.attached`, which holds an exclusive ``flock`` on ``<catalog>.lock`` (plus a mutex between
#   the threads of one process) from ATTACH to DETACH; an aegir process that opened the catalog without the lock
#   makes the ATTACH fail, which is retried until ``attach_timeout_s``;
# * Postgres catalog (several hosts): DuckLake commits optimistically and fails a transaction whose updates conflict
#   with one committed meanwhile; :func:`claim_cells` rolls back and retries (``connection.retry_on_conflict``).
#
# Lease times are the catalog host's ``now()`` seen by each worker: hosts need clocks synchronised (NTP) to well
# under the lease. Work is at-least-once: a worker whose lease lapsed (stalled past it, heartbeat lost) may still be
# working when another claims the cell, but only the new owner's :func:`complete_cell` counts, so the per-cell work
# must be idempotent (region inference replaces a cell's rows). Each transaction is a DuckLake snapshot: compact a
# long national run's small files with ``CALL ducklake_merge_adjacent_files('<alias>')``.

LEASE_STATUSES = ("done", "failed", "no_imagery")  # the ends a lease owner may give a cell


class LedgerSession:
    """One process's access to the plan ledger: an in-memory DuckDB with the lake's extensions loaded once (not
    ``spatial``: the ledger holds no geometry); each :meth:`attached` block attaches the lakehouse exclusively."""

    def __init__(self, settings: Settings, attach_timeout_s: float = 120.0):
        self.settings, self.attach_timeout_s = settings, attach_timeout_s
        self._mutex = threading.Lock()
        self._con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                           "autoload_known_extensions": False})
        for name in needed_extensions(settings):
            if name != "spatial":
                self._con.execute(f"LOAD {sql.quote(str(extension_path(name)))}")
        secret = s3_secret_statement(settings)
        if secret:
            self._con.execute(secret)
        catalog = settings.ducklake_catalog.removeprefix("ducklake:")
        self._lock_path = Path(catalog + ".lock") if settings.is_local_catalog else None
        if self._lock_path:
            self._lock_path.parent.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def attached(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The lakehouse attached as ``settings.ducklake_alias`` for one block, under the ledger lock."""
        with self._mutex, self._file_lock():
            self._attach()
            try:
                yield self._con
            finally:
                self._con.execute(f"DETACH {self.settings.ducklake_alias}")

    def close(self) -> None:
        self._con.close()

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        if self._lock_path is None:
            yield
            return
        with open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _attach(self) -> None:
        deadline, pause = time.monotonic() + self.attach_timeout_s, 0.05
        while True:
            try:
                self._con.execute(attach_statement(self.settings))
                return
            except duckdb.Error as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise StoreError(f"cannot attach DuckLake catalog {self.settings.ducklake_catalog!r}: {exc}") from exc
                time.sleep(pause + random.uniform(0, pause))  # another aegir process holds the catalog file
                pause = min(pause * 2, 1.0)


def _check_lease(worker_id: str, lease_seconds: float) -> None:
    if not worker_id:
        raise ValueError("a worker id is required")
    if not lease_seconds > 0:
        raise ValueError(f"lease_seconds must be > 0, got {lease_seconds}")


def claim_cells(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, worker_id: str, n: int, lease_seconds: float,
    max_attempts: int | None = None,
) -> pa.Table:
    """Lease up to ``n`` cells of ``plan_id`` to ``worker_id`` for ``lease_seconds``, in rank order: pending cells
    and running cells whose lease expired become running with this owner and attempts + 1. One transaction.

    With ``max_attempts``, an expired cell already tried that often becomes ``failed`` instead (a cell that kills
    its workers is not retried for ever). Returns the claimed rows (cell_token, rank, attempts, lease_expires_at)."""
    _check_lease(worker_id, lease_seconds)
    target = qualified(settings, PLAN_TABLE)

    def claim() -> pa.Table:
        con.execute("BEGIN TRANSACTION")
        try:
            found = con.execute(
                f"SELECT cell_token, rank, attempts + 1 AS attempts, now() + to_seconds(?) AS lease_expires_at, "
                f"status = 'running' AND attempts >= ? AS exhausted FROM {target} WHERE plan_id = ? AND "
                f"(status = 'pending' OR (status = 'running' AND coalesce(lease_expires_at < now(), true))) "
                f"ORDER BY rank LIMIT ?",
                [float(lease_seconds), max_attempts or 2**31, plan_id, int(n)]).to_arrow_table()
            exhausted = found["exhausted"].to_pylist()
            claimed = [t for t, x in zip(found["cell_token"].to_pylist(), exhausted) if not x]
            failed = [t for t, x in zip(found["cell_token"].to_pylist(), exhausted) if x]
            if failed:
                con.execute(f"UPDATE {target} SET status = 'failed', updated_at = now(), message = 'lease expired "
                            f"after ' || attempts || ' attempts' WHERE plan_id = ? AND {sql.in_list('cell_token', failed)}",
                            [plan_id])
            if claimed:
                con.execute(f"UPDATE {target} SET status = 'running', lease_owner = ?, message = NULL, "
                            f"lease_expires_at = now() + to_seconds(?), attempts = attempts + 1, updated_at = now() "
                            f"WHERE plan_id = ? AND {sql.in_list('cell_token', claimed)}",
                            [worker_id, float(lease_seconds), plan_id])
            con.execute("COMMIT")
        except BaseException:
            rollback(con)
            raise
        return found.filter(pa.compute.invert(found["exhausted"])).drop_columns(["exhausted"])

    return retry_on_conflict(_needs_plan_table(con, settings, plan_id, claim))


def _needs_plan_table(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str,
                      transaction: Callable[[], T]) -> Callable[[], T]:
    """``transaction``, raising StoreError (not a binder error) when there is no plan table or it predates leases."""
    def checked() -> T:
        try:
            return transaction()
        except duckdb.CatalogException as exc:
            if not table_exists(con, settings, PLAN_TABLE):
                raise StoreError(f"no grid plan {plan_id!r}: the lakehouse has no {PLAN_TABLE} table yet") from exc
            raise
        except duckdb.BinderException as exc:
            if "lease_" not in str(exc):
                raise
            raise StoreError(f"grid plan table predates leases: run prepare_leases (or re-plan) first ({exc})") from exc
    return checked


def prepare_leases(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str) -> None:
    """Check that ``plan_id`` has cells and give a plan table stored before leases its lease columns."""
    if not table_exists(con, settings, PLAN_TABLE):
        raise StoreError(f"no grid plan {plan_id!r}: the lakehouse has no {PLAN_TABLE} table yet")
    _add_lease_columns(con, settings)
    (cells,), = con.execute(f"SELECT count(*) FROM {qualified(settings, PLAN_TABLE)} WHERE plan_id = ?",
                            [plan_id]).fetchall()
    if not cells:
        raise StoreError(f"no grid plan {plan_id!r} in the lakehouse")


def renew_lease(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, worker_id: str, lease_seconds: float,
) -> list[str]:
    """Extend the lease of every cell ``worker_id`` still owns (running) to now + ``lease_seconds``, in one
    transaction; returns those cells' tokens. A cell missing from the answer was lost: its lease lapsed and another
    worker claimed it (or it was reset), so this worker must not complete it."""
    _check_lease(worker_id, lease_seconds)
    target = qualified(settings, PLAN_TABLE)
    owned = "plan_id = ? AND lease_owner = ? AND status = 'running'"

    def renew() -> list[str]:
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(f"UPDATE {target} SET lease_expires_at = now() + to_seconds(?) WHERE {owned}",
                        [float(lease_seconds), plan_id, worker_id])
            tokens = [t for (t,) in con.execute(f"SELECT cell_token FROM {target} WHERE {owned} ORDER BY rank",
                                                [plan_id, worker_id]).fetchall()]
            con.execute("COMMIT")
            return tokens
        except BaseException:
            rollback(con)
            raise

    return retry_on_conflict(_needs_plan_table(con, settings, plan_id, renew))


def complete_cell(
    con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str, cell_token: str, worker_id: str,
    status: str = "done", message: str | None = None,
) -> bool:
    """End a leased cell (``done``, ``failed`` or ``no_imagery``, with why) — only if ``worker_id`` still owns it
    (running, this lease owner). Returns False, changing nothing, when it does not: the lease was lost."""
    if status not in LEASE_STATUSES:
        raise ValueError(f"a leased cell ends as one of {', '.join(LEASE_STATUSES)}, not {status!r}")
    target = qualified(settings, PLAN_TABLE)

    def complete() -> bool:
        (changed,), = con.execute(
            f"UPDATE {target} SET status = ?, message = ?, lease_expires_at = NULL, updated_at = now() "
            f"WHERE plan_id = ? AND cell_token = ? AND lease_owner = ? AND status = 'running'",
            [status, message, plan_id, cell_token, worker_id]).fetchall()
        return changed == 1

    return retry_on_conflict(_needs_plan_table(con, settings, plan_id, complete))


def plan_progress(con: duckdb.DuckDBPyConnection, settings: Settings, plan_id: str) -> dict[str, float]:
    """Cells per status of ``plan_id`` (every status, 0 when none) and ``next_expiry_s``: seconds until the
    earliest running lease expires (≤ 0: already expired; absent without running cells or lease columns)."""
    if not table_exists(con, settings, PLAN_TABLE):
        raise StoreError(f"no grid plan {plan_id!r}: the lakehouse has no {PLAN_TABLE} table yet")
    expiry = "min(epoch(lease_expires_at)) - epoch(now())"
    query = f"SELECT status, count(*), {{}} FROM {qualified(settings, PLAN_TABLE)} WHERE plan_id = ? GROUP BY status"
    try:
        rows = con.execute(query.format(expiry), [plan_id]).fetchall()
    except duckdb.BinderException:  # a plan stored before leases
        rows = con.execute(query.format("NULL"), [plan_id]).fetchall()
    progress: dict[str, float] = dict.fromkeys(PLAN_STATUSES, 0)
    for status, count, seconds in rows:
        progress[status] = count
        if status == "running" and seconds is not None:
            progress["next_expiry_s"] = seconds
    return progress

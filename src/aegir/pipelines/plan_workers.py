"""Workers on a stored grid plan (``aegir plan work``): each claims cells with a lease, works them, completes them.

A worker loops: claim ``batch`` cells (pending, or running with an expired lease) → for each cell it still holds
with at least half a lease left (renewing first when less is left) run the work callable →
:func:`~aegir.store.ducklake.complete_cell` (``done``; ``failed`` with the error; ``no_imagery`` for
:class:`~aegir.dataflows.region_inference.NoImageryError`). A heartbeat thread renews its leases every
``lease_seconds / 3`` and notes cells it lost. When nothing is claimable the worker waits for the other workers'
leases (a dead worker's cells come back when its lease expires) and stops when no cell is pending or running.

The work is a callable ``work(cell_token) -> message | None`` named ``"module:function"`` so that fresh processes
can import it: :func:`run_local_workers` forks N processes from a fork server that imported this module once
(spawn where there is no fork server; each worker gets the starting command's environment), :func:`run_ray_workers`
starts N Ray tasks (one CPU each; their environment is Ray's ``runtime_env``). Leases make work at-least-once and
completion exactly-once (see the lease notes in :mod:`aegir.store.ducklake.plans`): the per-cell work must be
idempotent.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import os
import queue
import random
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aegir.config import Settings
from aegir.dataflows.region_inference import NoImageryError
from aegir.store import ducklake

WorkFn = Callable[[str], "str | None"]
_log = logging.getLogger(__name__)

# The fork server (see _process_context) forks workers from a process that has only imported modules, so lancedb's
# "fork support is experimental" caveat (state mid-operation at fork time) cannot apply there.
warnings.filterwarnings("ignore", message="lancedb fork support is experimental", category=RuntimeWarning)


@dataclass(frozen=True)
class WorkerOptions:
    """How a worker leases: ``batch`` cells per claim for ``lease_seconds``; an expired cell already tried
    ``max_attempts`` times fails; ``wait``: keep polling while other workers hold leases."""

    batch: int = 1
    lease_seconds: float = 300.0
    max_attempts: int | None = 3
    wait: bool = True

    def __post_init__(self) -> None:
        if self.batch < 1 or not self.lease_seconds > 0 or (self.max_attempts is not None and self.max_attempts < 1):
            raise ValueError(f"need batch ≥ 1, lease_seconds > 0 and max_attempts ≥ 1, got {self}")


@dataclass
class WorkerReport:
    """What one worker did: cells completed as done / failed / no_imagery, cells whose lease it lost."""

    worker_id: str
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    no_imagery: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class WorkRun:
    """A pool's outcome: the workers' reports, the workers that died (no report), the plan's status counts."""

    plan_id: str
    workers: int
    reports: list[WorkerReport]
    died: list[str]
    progress: dict[str, float]
    seconds: float

    @property
    def finished(self) -> bool:
        return not self.progress.get("pending") and not self.progress.get("running")


def load_work(spec: str) -> WorkFn:
    """The callable ``"package.module:function"`` (importable in a fresh process)."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(f"work {spec!r} must be 'module:function'")
    try:
        work = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"work {spec!r}: cannot import it ({exc})") from exc
    if not callable(work):
        raise TypeError(f"work {spec!r} is not callable")
    return work


def new_worker_id() -> str:
    """``host:pid:random``: unique among live workers, and readable in the ledger's ``lease_owner``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class _Leases:
    """The cells this worker holds, each with a conservative local expiry (``time.monotonic`` taken before the
    claim or renewal, so never later than the catalog's), renewed by :meth:`renew`; cells it lost."""

    def __init__(self, session: ducklake.LedgerSession, plan_id: str, worker_id: str, lease_seconds: float):
        self.session, self.plan_id, self.worker_id, self.lease_seconds = session, plan_id, worker_id, lease_seconds
        self.held: dict[str, float] = {}
        self.lost: set[str] = set()
        self._guard = threading.Lock()

    def hold(self, tokens: list[str], since: float) -> None:
        with self._guard:
            self.held.update(dict.fromkeys(tokens, since + self.lease_seconds))

    def release(self, token: str) -> None:
        with self._guard:
            self.held.pop(token, None)
            self.lost.discard(token)

    def renew(self) -> None:
        """Extend every held lease in one transaction; a cell held before it and not renewed was lost."""
        with self._guard:
            before = set(self.held)
        if not before:
            return
        since = time.monotonic()
        with self.session.attached() as con:
            renewed = set(ducklake.renew_lease(con, self.session.settings, self.plan_id, self.worker_id,
                                               self.lease_seconds))
        with self._guard:
            for token in before & set(self.held):
                if token in renewed:
                    self.held[token] = since + self.lease_seconds
                else:
                    self.lost.add(token)

    def ready(self, token: str) -> bool:
        """True when ``token`` is still ours with at least half a lease left (renewing first when less is left)."""
        with self._guard:
            if token in self.lost or token not in self.held:
                return False
            left = self.held[token] - time.monotonic()
        if left < self.lease_seconds / 2:
            try:
                self.renew()
            except Exception as exc:  # noqa: BLE001 - unsure of the lease: leave the cell to expire, do not work it
                _log.warning("worker %s: lease renewal failed (%s)", self.worker_id, exc)
                return False
            with self._guard:
                return token in self.held and token not in self.lost
        return True


class _Heartbeat(threading.Thread):
    """Renews the worker's leases every ``lease_seconds / 3`` while it holds cells."""

    def __init__(self, leases: _Leases):
        super().__init__(daemon=True, name=f"lease-heartbeat-{leases.worker_id}")
        self.leases, self._halt = leases, threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.wait(self.leases.lease_seconds / 3):
            try:
                self.leases.renew()
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried next beat; the lease covers the gap
                _log.warning("worker %s: lease renewal failed (%s); retrying", self.leases.worker_id, exc)


def _work_cell(work: WorkFn, token: str) -> tuple[str, str | None]:
    """(status, message) of running ``work`` on one cell."""
    try:
        return "done", work(token)
    except NoImageryError as exc:
        return "no_imagery", str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure of the per-cell work is recorded, the worker goes on
        return "failed", f"{type(exc).__name__}: {exc}"


def _idle_pause(progress: dict[str, float], lease_seconds: float) -> float | None:
    """Seconds to wait before claiming again, None when the plan has nothing pending or running."""
    if not progress.get("pending") and not progress.get("running"):
        return None
    poll = min(max(lease_seconds / 4, 0.2), 10.0)
    return min(poll, max(progress.get("next_expiry_s", poll), 0.05)) + random.uniform(0, 0.1)


def run_worker(settings: Settings, plan_id: str, work: WorkFn, options: WorkerOptions = WorkerOptions(),
               worker_id: str | None = None) -> WorkerReport:
    """Claim, work and complete cells of ``plan_id`` until none is pending or running (see the module notes)."""
    report = WorkerReport(worker_id or new_worker_id())
    started, session = time.perf_counter(), ducklake.LedgerSession(settings)
    leases = _Leases(session, plan_id, report.worker_id, options.lease_seconds)
    heartbeat = _Heartbeat(leases)
    heartbeat.start()
    try:
        with session.attached() as con:
            ducklake.prepare_leases(con, settings, plan_id)
        while (tokens := _claim(session, plan_id, report.worker_id, options, leases)) is not None:
            for token in tokens:
                _run_one(session, plan_id, work, token, leases, report)
    finally:
        heartbeat.stop()
        session.close()
    report.seconds = time.perf_counter() - started
    return report


def _claim(session: ducklake.LedgerSession, plan_id: str, worker_id: str, options: WorkerOptions,
           leases: _Leases) -> list[str] | None:
    """The next claimed cells (held in ``leases``), waiting while other workers hold leases; None when done."""
    while True:
        since = time.monotonic()
        with session.attached() as con:
            claimed = ducklake.claim_cells(con, session.settings, plan_id, worker_id, options.batch,
                                           options.lease_seconds, options.max_attempts)
            progress = {} if claimed.num_rows else ducklake.plan_progress(con, session.settings, plan_id)
        if claimed.num_rows:
            leases.hold(claimed["cell_token"].to_pylist(), since)
            return claimed["cell_token"].to_pylist()
        pause = _idle_pause(progress, options.lease_seconds) if options.wait else None
        if pause is None:
            return None
        time.sleep(pause)


def _run_one(session: ducklake.LedgerSession, plan_id: str, work: WorkFn, token: str, leases: _Leases,
             report: WorkerReport) -> None:
    """Work one held cell and complete it as its lease owner (a lost lease: the cell is left to its new owner)."""
    completed = False
    if leases.ready(token):
        status, message = _work_cell(work, token)
        with session.attached() as con:
            completed = ducklake.complete_cell(con, session.settings, plan_id, token, report.worker_id, status,
                                               message)
        if completed:
            {"done": report.done, "failed": report.failed, "no_imagery": report.no_imagery}[status].append(token)
    if not completed:
        report.lost.append(token)
    leases.release(token)


def _process_main(settings: Settings, plan_id: str, work_spec: str, options: WorkerOptions,
                  environ: dict[str, str], reports: Any) -> None:
    """Entry of a worker process: the starting command's environment, a worker, its report on the queue."""
    os.environ.update(environ)
    reports.put(run_worker(settings, plan_id, load_work(work_spec), options))


def _plan_progress(settings: Settings, plan_id: str, prepare: bool = False) -> dict[str, float]:
    """The plan's status counts (``prepare``: first check it has cells and lease columns, StoreError if not)."""
    session = ducklake.LedgerSession(settings)
    try:
        with session.attached() as con:
            if prepare:
                ducklake.prepare_leases(con, settings, plan_id)
            return ducklake.plan_progress(con, settings, plan_id)
    finally:
        session.close()


def _process_context() -> Any:
    """``forkserver`` with this module preloaded (one import of the package for all workers), else ``spawn``:
    workers never fork a process holding open DuckDB / Lance handles."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


def run_local_workers(settings: Settings, plan_id: str, work_spec: str, workers: int,
                      options: WorkerOptions = WorkerOptions()) -> WorkRun:
    """``workers`` processes on this machine (see :func:`_process_context`), each :func:`run_worker`; a worker that
    dies (killed, out of memory) is reported in ``died`` and its cells return to the others when its lease expires."""
    load_work(work_spec)  # fail here, not in every process
    _plan_progress(settings, plan_id, prepare=True)
    started, context = time.perf_counter(), _process_context()
    reports_queue = context.Queue()
    processes = [context.Process(target=_process_main, name=f"aegir-plan-worker-{k}",
                                 args=(settings, plan_id, work_spec, options, dict(os.environ), reports_queue))
                 for k in range(workers)]
    for process in processes:
        process.start()
    reports: list[WorkerReport] = []
    while any(p.is_alive() for p in processes) or not reports_queue.empty():
        try:
            reports.append(reports_queue.get(timeout=0.2))
        except queue.Empty:
            pass
    for process in processes:
        process.join()
    died = [f"{p.name} (pid {p.pid}, exit code {p.exitcode})" for p in processes if p.exitcode != 0]
    return WorkRun(plan_id, workers, reports, died, _plan_progress(settings, plan_id), time.perf_counter() - started)


def _ray_worker(settings: Settings, plan_id: str, work_spec: str, options: WorkerOptions) -> WorkerReport:
    return run_worker(settings, plan_id, load_work(work_spec), options)


def run_ray_workers(settings: Settings, plan_id: str, work_spec: str, workers: int, address: str | None,
                    options: WorkerOptions = WorkerOptions()) -> WorkRun:
    """``workers`` Ray tasks (1 CPU each, not retried) on the cluster at ``address`` ("auto", "ray://head:10001";
    None: a local cluster). Every node must reach the lakehouse: a local catalog only serves a one-node cluster
    (the lock file is per machine); several nodes need the Postgres catalog."""
    from aegir.pipelines.ray_scale import ray_cluster

    load_work(work_spec)
    _plan_progress(settings, plan_id, prepare=True)
    started = time.perf_counter()
    with ray_cluster(address) as ray:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_worker)
        refs = [task.remote(settings, plan_id, work_spec, options) for _ in range(workers)]
        reports, died = [], []
        for k, ref in enumerate(refs):
            try:
                reports.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - a lost Ray task is one dead worker, the rest go on
                died.append(f"ray task {k} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    return WorkRun(plan_id, workers, reports, died, _plan_progress(settings, plan_id), time.perf_counter() - started)

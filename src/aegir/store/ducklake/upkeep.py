"""Lakehouse upkeep (``aegir lake maintain``): DuckLake's own maintenance functions, in the order that frees space.

1. ``ducklake_flush_inlined_data``, ``ducklake_rewrite_data_files`` and ``ducklake_merge_adjacent_files``: small
   inserts (inlined in the catalog, or one small Parquet file per commit) and files that are mostly deleted rows
   become fewer, larger files; the replaced files are scheduled for deletion.
2. ``ducklake_expire_snapshots``: snapshots older than the retention are dropped (time travel to them ends); files
   only they referenced are scheduled for deletion. The current snapshot is never expired.
3. ``ducklake_cleanup_old_files``: files scheduled for deletion more than the retention ago are deleted (with
   ``cleanup_all``: every scheduled file, for a lake no reader is using).
4. ``ducklake_delete_orphaned_files``: files under DATA_PATH that no snapshot references and that are older than
   the retention (e.g. the Parquet of a killed writer's uncommitted transaction) are deleted.

The same code runs on a local catalog + folder and on PostgreSQL + S3; ``dry_run`` lists without changing anything.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import duckdb

from aegir.config import Settings
from aegir.store import sql


@dataclass
class LakeUpkeep:
    """What :func:`maintain_lakehouse` did (or, with ``dry_run``, would do)."""

    snapshots_before: int
    snapshots_after: int
    expired_snapshots: list[int] = field(default_factory=list)
    deleted_files: list[str] = field(default_factory=list)  # scheduled files removed (expired / merged)
    orphaned_files: list[str] = field(default_factory=list)  # untracked files removed
    dry_run: bool = False


def _snapshot_count(con: duckdb.DuckDBPyConnection, alias: str) -> int:
    return con.execute(f"SELECT count(*) FROM {alias}.snapshots()").fetchone()[0]


def maintain_lakehouse(con: duckdb.DuckDBPyConnection, settings: Settings, older_than: dt.timedelta,
                       dry_run: bool = False) -> LakeUpkeep:
    """Compact, expire snapshots older than ``older_than``, delete the files that frees and orphaned files older
    than ``older_than`` (``older_than`` zero: everything but the current snapshot, every scheduled file)."""
    alias = settings.ducklake_alias
    name = sql.quote(alias)
    report = LakeUpkeep(_snapshot_count(con, alias), 0, dry_run=dry_run)
    if not dry_run:
        for function in ("ducklake_flush_inlined_data", "ducklake_rewrite_data_files", "ducklake_merge_adjacent_files"):
            con.execute(f"CALL {function}({name})")
    cutoff = sql.quote((dt.datetime.now(dt.timezone.utc) - older_than).isoformat())  # after compaction's snapshots
    dry = "true" if dry_run else "false"
    expired = con.execute(f"CALL ducklake_expire_snapshots({name}, dry_run => {dry}, "
                          f"older_than => {cutoff}::TIMESTAMPTZ)").fetchall()
    report.expired_snapshots = sorted(int(row[0]) for row in expired)
    every = "cleanup_all => true" if older_than <= dt.timedelta(0) else f"older_than => {cutoff}::TIMESTAMPTZ"
    report.deleted_files = sorted(row[0] for row in con.execute(
        f"CALL ducklake_cleanup_old_files({name}, dry_run => {dry}, {every})").fetchall())
    report.orphaned_files = sorted(row[0] for row in con.execute(
        f"CALL ducklake_delete_orphaned_files({name}, dry_run => {dry}, {every})").fetchall())
    report.snapshots_after = _snapshot_count(con, alias)
    return report

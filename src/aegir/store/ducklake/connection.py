"""Opening the lakehouse: offline extension loading, the ATTACH / S3 secret statements, table helpers,
transactions and snapshots. Extensions are loaded from the ``duckdb-extension-*`` registry packages, never
downloaded."""

from __future__ import annotations

import contextlib
import importlib.util
import random
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import duckdb
import pyarrow as pa

from aegir.config import Settings
from aegir.store import sql
from aegir.store.errors import StoreError

T = TypeVar("T")
CONFLICT_RETRIES = 8  # DuckLake commit conflicts retried this often (backoff 10 ms .. ~6 s)


class ExtensionMissingError(StoreError):
    """A DuckDB extension package is not installed."""


def extension_path(name: str) -> Path:
    """Path of ``<name>.duckdb_extension`` inside the ``duckdb-extension-<name>`` package for this DuckDB version."""
    module = f"duckdb_extension_{name.replace('-', '_')}"
    package = f"duckdb-extension-{name}=={duckdb.__version__}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ExtensionMissingError(
            f"DuckDB extension {name!r} is not installed: run `pip install {package}` "
            "(aegir loads extensions from these packages and never downloads them)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "extensions" / f"v{duckdb.__version__}"
    candidate = folder / f"{name}.duckdb_extension"
    if not candidate.is_file():
        raise ExtensionMissingError(
            f"{candidate} is missing: the installed {module} does not match duckdb {duckdb.__version__}; "
            f"run `pip install {package}`"
        )
    return candidate


def needed_extensions(settings: Settings) -> list[str]:
    """Extensions this configuration needs: ducklake and spatial always; postgres_scanner for a PostgreSQL
    catalog; httpfs for an object-store DATA_PATH, and aws for the credential chain of an S3 / R2 one."""
    names = ["ducklake", "spatial"]
    if settings.ducklake_catalog.removeprefix("ducklake:").startswith("postgres:"):
        names.append("postgres_scanner")
    if settings.ducklake_data_path.startswith(("s3://", "r2://", "gs://", "https://")):
        names.append("httpfs")
    if settings.ducklake_data_path.startswith(("s3://", "r2://")):
        names.append("aws")
    return names


def s3_secret_statement(settings: Settings) -> str | None:
    """``CREATE SECRET`` for an object-store DATA_PATH (credentials from the AWS chain / env), else None."""
    if not settings.ducklake_data_path.startswith(("s3://", "r2://")):
        return None
    options = ["TYPE s3", "PROVIDER credential_chain"]
    if settings.s3_region:
        options.append(f"REGION {sql.quote(settings.s3_region)}")
    if settings.s3_endpoint:
        options.append(f"ENDPOINT {sql.quote(settings.s3_endpoint)}")
    if settings.s3_url_style:
        options.append(f"URL_STYLE {sql.quote(settings.s3_url_style)}")
    if settings.s3_use_ssl is not None:
        options.append(f"USE_SSL {'true' if settings.s3_use_ssl else 'false'}")
    return f"CREATE OR REPLACE SECRET aegir_lake_s3 ({', '.join(options)})"


def attach_statement(settings: Settings) -> str:
    """The ``ATTACH 'ducklake:…' AS <alias> (DATA_PATH …)`` statement for these settings."""
    catalog = settings.ducklake_catalog.removeprefix("ducklake:")
    return (
        f"ATTACH {sql.quote('ducklake:' + catalog)} AS {settings.ducklake_alias} "
        f"(DATA_PATH {sql.quote(settings.ducklake_data_path)})"
    )


def connect(settings: Settings) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lakehouse attached as ``settings.ducklake_alias``.

    Raises :class:`ExtensionMissingError` when an extension package is absent, :class:`StoreError` when the
    catalog cannot be attached (the message names the catalog).
    """
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    for name in needed_extensions(settings):
        con.execute(f"LOAD {sql.quote(str(extension_path(name)))}")
    if settings.is_local_catalog:
        Path(settings.ducklake_catalog.removeprefix("ducklake:")).parent.mkdir(parents=True, exist_ok=True)
        Path(settings.ducklake_data_path).mkdir(parents=True, exist_ok=True)
    secret = s3_secret_statement(settings)
    if secret:
        con.execute(secret)
    try:
        con.execute(attach_statement(settings))
    except duckdb.Error as exc:
        con.close()
        raise StoreError(f"cannot attach DuckLake catalog {settings.ducklake_catalog!r}: {exc}") from exc
    return con


# ---- tables -------------------------------------------------------------------------------------------------


def qualified(settings: Settings, table: str) -> str:
    """``<alias>."<table>"``: a lakehouse table name for SQL text (table names are validated by their callers)."""
    return f'{settings.ducklake_alias}."{table}"'


def table_exists(con: duckdb.DuckDBPyConnection, settings: Settings, table: str) -> bool:
    """True when ``table`` exists in the lakehouse's main schema."""
    rows = con.execute(
        "SELECT 1 FROM duckdb_tables() WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
        [settings.ducklake_alias, table],
    ).fetchall()
    return bool(rows)


def table_columns(con: duckdb.DuckDBPyConnection, settings: Settings, table: str) -> dict[str, str]:
    """{lower-case column name: DuckDB type} of a lakehouse table."""
    rows = con.execute(
        "SELECT column_name, data_type FROM duckdb_columns() "
        "WHERE database_name = ? AND schema_name = 'main' AND table_name = ?",
        [settings.ducklake_alias, table],
    ).fetchall()
    return {name.lower(): dtype for name, dtype in rows}


def add_missing_columns(con: duckdb.DuckDBPyConnection, settings: Settings, table: str, view: str) -> None:
    """Schema evolution: columns of the incoming batch that the table lacks are added (nullable)."""
    existing = table_columns(con, settings, table)
    incoming = con.execute(f"DESCRIBE {view}").fetchall()
    for name, dtype, *_ in incoming:
        if name.lower() not in existing:
            con.execute(f'ALTER TABLE {qualified(settings, table)} ADD COLUMN "{name}" {dtype}')


def insert_new_rows(con: duckdb.DuckDBPyConnection, settings: Settings, table: str, view: str) -> int:
    """Create ``table`` from ``view`` or insert the rows whose ``row_hash`` it lacks; returns rows inserted."""
    target = qualified(settings, table)
    if not table_exists(con, settings, table):
        con.execute(f"CREATE TABLE {target} AS SELECT * FROM {view}")
        return con.execute(f"SELECT count(*) FROM {view}").fetchone()[0]
    add_missing_columns(con, settings, table, view)
    before = con.execute(f"SELECT count(*) FROM {target}").fetchone()[0]
    con.execute(
        f"INSERT INTO {target} BY NAME SELECT * FROM {view} "
        f"WHERE row_hash NOT IN (SELECT row_hash FROM {target})"
    )
    return con.execute(f"SELECT count(*) FROM {target}").fetchone()[0] - before


# ---- transactions and snapshots -----------------------------------------------------------------------------


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction; a failed COMMIT has already rolled back, and that is not a new error (the
    original one is what the caller re-raises)."""
    try:
        con.execute("ROLLBACK")
    except duckdb.Error as exc:
        if "no transaction is active" not in str(exc).lower():
            raise


def is_conflict(exc: duckdb.Error) -> bool:
    """True for a DuckLake commit conflict (another writer committed an overlapping change first)."""
    return isinstance(exc, duckdb.TransactionException) or "conflict" in str(exc).lower()


def retry_on_conflict(transaction: Callable[[], T], retries: int = CONFLICT_RETRIES) -> T:
    """Run ``transaction`` (which opens, commits or rolls back its own transaction); a commit conflict runs it
    again after a random backoff that doubles each time, at most ``retries`` times in all; other errors and the
    last conflict propagate."""
    for attempt in range(retries):
        try:
            return transaction()
        except duckdb.Error as exc:
            if not is_conflict(exc) or attempt == retries - 1:
                raise
            time.sleep(random.uniform(0.01, 0.05 * 2**attempt))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def transaction_with(con: duckdb.DuckDBPyConnection, view: str, rows: pa.Table) -> Iterator[None]:
    """One transaction with ``rows`` registered as ``view``: committed on success, rolled back on any error."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.register(view, rows)
        yield
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.unregister(view)


def current_snapshot_id(con: duckdb.DuckDBPyConnection, settings: Settings) -> int:
    """The lakehouse's current DuckLake snapshot id."""
    return con.execute("SELECT id FROM ducklake_current_snapshot(?)", [settings.ducklake_alias]).fetchone()[0]


def snapshots(con: duckdb.DuckDBPyConnection, settings: Settings) -> Iterator[dict]:
    """The lakehouse's snapshots (id, time, changes), oldest first."""
    cursor = con.execute(
        f"SELECT snapshot_id, snapshot_time, changes FROM {settings.ducklake_alias}.snapshots() ORDER BY snapshot_id"
    )
    for snapshot_id, snapshot_time, changes in cursor.fetchall():
        yield {"snapshot_id": snapshot_id, "snapshot_time": snapshot_time, "changes": changes}

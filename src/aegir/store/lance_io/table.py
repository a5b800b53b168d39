"""Opening, writing and versioning the LanceDB ``training_data`` table.

Writes go through LanceDB (``merge_insert`` keyed on ``uuid``: one commit per call, so readers never see half a
batch); earlier versions are read with ``lance`` (``LanceDataset.checkout_version``) without moving the table.

Indexing decision (measured with pylance 14.0.2 / lancedb 0.40.0): a BTREE scalar index builds on a nested struct
field (``create_index("metadata.s2_token_l13", config=BTree())``) and the planner uses it for
``metadata.s2_token_l13 = '…'``, ``IN (…)`` and ``starts_with(metadata.s2_token_l13, '…')`` (rewritten to an
escaped ``LIKE 'prefix%'``), as ``explain_plan`` shows (``ScalarIndexQuery … @metadata.s2_token_l13_idx(BTree)``).
So the S2 tokens and ``dataset`` stay nested in ``metadata`` only; there are no top-level copies.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lancedb
import pyarrow as pa
from lancedb.index import BTree

from aegir.config import DEFAULT_H3_RESOLUTION, DEFAULT_S2_LEVELS, Settings
from aegir.store.lance_io.schema import (
    ADDED_COLUMNS,
    DATA_STORAGE_VERSION,
    DEFAULT_TABLE,
    StoreError,
    index_columns,
    leaf_types,
    schema_of,
    schema_problems,
    stored_s2_levels,
    training_data_schema,
)
from aegir.store.errors import one_line
from aegir.store.lance_io.validate import validate_rows


INDEX_ATTEMPTS = 5  # an index commit preempted by a concurrent writer's is retried this often


@dataclass(frozen=True)
class UpsertResult:
    """Outcome of one :func:`upsert_training_rows` commit."""

    inserted: int
    updated: int
    version: int


# ---- locations and opening ----------------------------------------------------------------------------------


def resolve_table_location(
    uri: str | None, lancedb_root: str, default_table: str = DEFAULT_TABLE
) -> tuple[str, str]:
    """Split a table location into (database root, table name).

    ``None`` → ``(lancedb_root, default_table)``; ``a/b/training_data`` or ``a/b/training_data.lance`` or
    ``s3://bucket/db/training_data`` → (parent, name without ``.lance``); a bare name is a table under
    ``lancedb_root``.
    """
    if uri is None:
        return lancedb_root, default_table
    scheme, sep, rest = uri.strip().partition("://")
    body = (rest if sep else scheme).rstrip("/\\")
    if not body:
        raise StoreError(f"empty LanceDB table location {uri!r}")
    cut = max(body.rfind("/"), body.rfind(os.sep))
    parent, name = (body[:cut], body[cut + 1 :]) if cut >= 0 else ("", body)
    name = name.removesuffix(".lance")
    if not name:
        raise StoreError(f"LanceDB table location {uri!r} names no table")
    if sep:
        if not parent:
            raise StoreError(f"LanceDB table location {uri!r} has no database path before the table name")
        return f"{scheme}://{parent}", name
    if cut < 0:
        return lancedb_root, name
    return parent or "/", name


def object_store_env(settings: Settings) -> dict[str, str]:
    """The ``AWS_*`` variables through which Lance / LanceDB reach the S3-compatible store of ``settings.s3_*``
    (the one DuckLake's DATA_PATH uses): endpoint (``http://`` when ``s3_use_ssl`` is false), region, path or
    virtual-host style. Credentials are not among them: they stay in the environment / credential chain."""
    env: dict[str, str] = {}
    if settings.s3_endpoint:
        scheme = "http" if settings.s3_use_ssl is False else "https"
        endpoint = settings.s3_endpoint if "://" in settings.s3_endpoint else f"{scheme}://{settings.s3_endpoint}"
        env["AWS_ENDPOINT"] = endpoint
        if endpoint.startswith("http://"):
            env["AWS_ALLOW_HTTP"] = "true"
    if settings.s3_region:
        env["AWS_REGION"] = settings.s3_region
    if settings.s3_url_style:
        env["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "true" if settings.s3_url_style == "vhost" else "false"
    return env


def use_object_store_settings(settings: Settings) -> None:
    """Export :func:`object_store_env` into this process (and the processes it starts); a variable already set
    in the environment wins."""
    for name, value in object_store_env(settings).items():
        os.environ.setdefault(name, value)


def is_local(path: str) -> bool:
    """True for a local path or ``file://`` URI (not an object store)."""
    return "://" not in path or path.startswith("file://")


def local_path(path: str) -> Path:
    """The local folder of a local path or ``file://`` URI."""
    return Path(path.removeprefix("file://"))


def open_training_table(
    uri: str | None,
    lancedb_root: str,
    create: bool = True,
    s2_levels: Sequence[int] = DEFAULT_S2_LEVELS,
    h3_resolution: int = DEFAULT_H3_RESOLUTION,
) -> lancedb.table.Table:
    """Open the training table at ``uri`` (see :func:`resolve_table_location`), creating it when ``create``.

    A new table gets the schema of ``s2_levels`` / ``h3_resolution`` (``Settings.s2_levels`` /
    ``Settings.h3_resolution``); an existing one keeps its own and is only checked for the training columns.
    """
    root, name = resolve_table_location(uri, lancedb_root)
    location = f"{root.rstrip('/')}/{name}.lance"
    if not create and is_local(root) and not (local_path(root) / f"{name}.lance").exists():
        raise StoreError(f"no LanceDB training table at {location} (build it with `aegir dataset build`)")
    try:
        db = lancedb.connect(root)
        try:
            table = db.open_table(name)
        except (ValueError, FileNotFoundError) as exc:
            if not create:
                raise StoreError(f"no LanceDB training table at {location}: {one_line(exc, 400)}") from exc
            table = db.create_table(
                name, schema=training_data_schema(s2_levels, h3_resolution), exist_ok=True,
                storage_options={"new_table_data_storage_version": DATA_STORAGE_VERSION},
            )
    except (OSError, RuntimeError, ValueError) as exc:
        if isinstance(exc, StoreError):
            raise
        raise StoreError(f"cannot open or create the LanceDB table {location}: {one_line(exc, 400)}") from exc
    problems = schema_problems(table.schema)
    missing = [f for f in ADDED_COLUMNS if f.name not in table.schema.names]
    added = {f"missing column {path}" for f in missing for path in leaf_types(pa.schema([f]))}
    if missing and set(problems) <= added:
        table.add_columns(missing)  # a training table from before these columns: they arrive all null
        problems = schema_problems(table.schema)
    if problems:
        raise StoreError(f"the table at {location} is not a training_data table: " + "; ".join(problems))
    return table


# ---- writes, indexes, versions ------------------------------------------------------------------------------


def upsert_training_rows(table: lancedb.table.Table, rows: pa.Table | Sequence[Mapping[str, Any]]) -> UpsertResult:
    """Insert or replace rows by ``uuid`` in one commit; nothing is written when validation fails.

    Rows are checked against the training schema of the table's own S2 levels and H3 resolution."""
    batch = validate_rows(rows, schema_of(table.schema))
    before = table.version
    if batch.num_rows == 0:
        return UpsertResult(inserted=0, updated=0, version=before)
    try:
        result = (
            table.merge_insert("uuid").when_matched_update_all().when_not_matched_insert_all().execute(batch)
        )
    except (OSError, RuntimeError) as exc:  # the object store went away, a disk filled: lance's IO errors
        raise StoreError(f"{table.uri}: writing {batch.num_rows} rows failed and none of them was committed; the "
                         f"table stays at version {before}; re-run once the store is reachable (rows are keyed "
                         f"by uuid, so a re-run completes the work). Cause: {one_line(exc, 400)}") from exc
    return UpsertResult(
        inserted=int(result.num_inserted_rows), updated=int(result.num_updated_rows), version=int(result.version)
    )


def ensure_scalar_indexes(table: lancedb.table.Table, columns: Iterable[str] | None = None,
                          missing_only: bool = False) -> list[str]:
    """Build missing or stale BTREE indexes on ``columns`` (default: uuid, dataset and the table's S2 token
    fields); return the columns (re)indexed (none when the table is empty). Each index is one table version.

    ``missing_only``: leave stale indexes as they are (Lance answers a filter from the index plus a scan of the
    rows written since; ``aegir dataset optimize`` folds those in), so a build adds no index versions to a
    table that has its indexes."""
    if table.count_rows() == 0:
        return []
    columns = index_columns(stored_s2_levels(table.schema)) if columns is None else columns
    existing = {tuple(idx.columns): idx for idx in table.list_indices()}
    built = []
    for column in columns:
        idx = existing.get((column,))
        if idx is not None and (missing_only or idx.num_unindexed_rows == 0):
            continue
        if _create_index(table, column, missing_only):
            built.append(column)
    return built


def _create_index(table: lancedb.table.Table, column: str, missing_only: bool) -> bool:
    """Build the BTREE index on ``column``; False when a concurrent writer built the missing index first. Lance
    rejects an index commit that another index commit preempted ("Retryable commit conflict"): retried with
    backoff, at most ``INDEX_ATTEMPTS`` times."""
    for attempt in range(INDEX_ATTEMPTS):
        try:
            table.create_index(column, config=BTree(), replace=True)
            return True
        except (OSError, RuntimeError) as exc:
            table.checkout_latest()  # this handle does not see other processes' commits until asked to
            if missing_only and any(tuple(idx.columns) == (column,) for idx in table.list_indices()):
                return False  # another build made it meanwhile
            if "conflict" not in str(exc).lower() or attempt == INDEX_ATTEMPTS - 1:
                raise StoreError(f"{table.uri}: building the {column} index failed; the rows are committed "
                                 f"(version {table.version}); `aegir dataset optimize` builds it later. Cause: "
                                 f"{one_line(exc, 400)}") from exc
            time.sleep(random.uniform(0.05, 0.2 * 2**attempt))
    raise AssertionError("unreachable")


def table_versions(table: lancedb.table.Table) -> list[dict[str, Any]]:
    """Every version of the table: ``version``, ``timestamp`` and ``rows``, oldest first."""
    out = []
    for v in table.list_versions():
        rows = (v.get("metadata") or {}).get("total_rows")
        out.append({"version": int(v["version"]), "timestamp": v["timestamp"], "rows": int(rows) if rows else 0})
    return sorted(out, key=lambda v: v["version"])


def read_version(table: lancedb.table.Table, version: int, columns: Mapping[str, str] | None = None) -> pa.Table:
    """All rows as of ``version`` — every column, or ``columns`` (output name → column path such as
    ``metadata.dataset``); the table object stays at the version it was at."""
    known = [v["version"] for v in table_versions(table)]
    if version not in known:
        raise StoreError(f"version {version} of {table.uri} does not exist (versions: {known})")
    return table.to_lance().checkout_version(version).to_table(columns=dict(columns) if columns else None)


def copy_masked_rows(source_uri: str, lancedb_root: str, table: lancedb.table.Table) -> dict[str, int]:
    """Upsert every row of the training table at ``source_uri`` that has a mask (truth or generated) into
    ``table`` (same S2 levels / H3 resolution, else a StoreError naming both); returns rows per dataset."""
    source = open_training_table(source_uri, lancedb_root, create=False)
    rows = source.to_lance().to_table(filter="truth_mask IS NOT NULL OR generated_mask IS NOT NULL")
    if rows.num_rows == 0:
        raise StoreError(f"{source_uri}: no rows with a mask to seed from")
    try:
        upsert_training_rows(table, rows)
    except (ValueError, StoreError) as exc:
        raise StoreError(f"cannot copy the rows of {source_uri} into {table.uri}: {exc}") from exc
    datasets = rows.column("metadata").combine_chunks().field("dataset").to_pylist()
    return {name: datasets.count(name) for name in sorted(set(datasets))}

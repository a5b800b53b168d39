"""Distributed Lance writes: workers write fragments, the driver commits them once, replacing rows by ``uuid``.

Why not Ray's ``write_lance``: it fails with pylance 14. Why not a staging table + one ``merge_insert``: that
rewrites every byte a second time through the single driver process. Here each worker writes its rows once,
straight into the target dataset's ``data/`` folder (:func:`write_fragments`); the files are invisible until the
driver's commit. :func:`commit_fragments` then makes ONE new version: a plain ``Append`` when none of the
incoming uuids is in the table yet, else an ``Update`` that, in the same commit, adds the new fragments and marks
the old rows of those uuids deleted (deletion files on only the fragments that hold them). So a re-run replaces
rows instead of duplicating them, and readers see all of a build or none of it. The commit names the version the
deletions were computed on (``read_version``), so Lance rejects it when a concurrent commit touched the same
fragments; the commit then reads the table again, recomputes the deletions and retries (``COMMIT_ATTEMPTS``).
Lance itself rebases commits that do not overlap (two appends). Two runs appending the same NEW uuids at once
would both land (one writer per uuid at a time).

Fragment metadata crosses processes as JSON strings (``FragmentMetadata.to_json``). Credentials for object
stores come from the environment (``AWS_*``), as for every other Lance/LanceDB access here.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from typing import Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from lance.fragment import FragmentMetadata

from aegir.store import lance_io, sql
from aegir.store.lance_io import StoreError

COMMIT_ATTEMPTS = 5  # a conflicting Update is recomputed and committed again at most this often
CHIP_PREDICTIONS_TABLE = "predictions"  # the Lance table of per-chip predictions (not the lakehouse predicted_pv)

PREDICTIONS_SCHEMA: pa.Schema = pa.schema(
    [
        pa.field("uuid", pa.string(), nullable=False),  # the training_data row predicted
        pa.field("pv_mask", pa.binary(), nullable=False),  # raw C-order (H, W) uint8, 1 = PV
        pa.field("pv_probability", pa.binary(), nullable=False),  # raw (H, W) uint8, round(p × 255)
        pa.field("mask_shape", pa.list_(pa.int32()), nullable=False),  # [H, W]
        pa.field("pv_fraction", pa.float32(), nullable=False),  # share of pixels with p ≥ threshold
        pa.field("threshold", pa.float32(), nullable=False),
        pa.field("checkpoint", pa.string(), nullable=False),
        pa.field("model_data_version", pa.int64(), nullable=False),  # training_data version the model saw
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_version", pa.int64(), nullable=False),  # training_data version that was read
        pa.field("predicted_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


@dataclass(frozen=True)
class FragmentCommit:
    """Outcome of :func:`commit_fragments`: rows new to the table, rows replaced, the committed version."""

    inserted: int
    updated: int
    version: int


def training_dataset_uri(uri: str | None, lancedb_root: str) -> str:
    """Lance dataset URI of the ``training_data`` table at ``uri`` (created empty when missing)."""
    return lance_io.open_training_table(uri, lancedb_root).to_lance().uri


def predictions_dataset_uri(out_uri: str | None, lancedb_root: str) -> str:
    """Lance dataset URI of the predictions table at ``out_uri`` (default ``predictions`` under the LanceDB root);
    created empty, Lance format 2.0, when missing; a table of another schema is an error."""
    root, name = lance_io.resolve_table_location(out_uri, lancedb_root, CHIP_PREDICTIONS_TABLE)
    location = f"{root.rstrip('/')}/{name}.lance"
    try:
        dataset = lance.dataset(location)
    except (ValueError, FileNotFoundError, OSError):
        dataset = lance.write_dataset(PREDICTIONS_SCHEMA.empty_table(), location, mode="create",
                                      data_storage_version=lance_io.DATA_STORAGE_VERSION)
    if not dataset.schema.equals(PREDICTIONS_SCHEMA, check_metadata=False):
        raise StoreError(f"{location} is not a predictions table (schema {dataset.schema})")
    return location


def _unsliced(rows: pa.Table) -> pa.Table:
    """``rows`` with every array starting at offset 0 (a copy only when needed): pylance 14.0.2's writer panics
    (``assertion failed: end <= self.len()``) on a sliced ``metadata`` struct, e.g. ``table.slice(5, 10)``."""
    if any(chunk.offset for column in rows.columns for chunk in column.chunks):
        return rows.take(pa.array(np.arange(rows.num_rows)))
    return rows


def write_fragments(rows: pa.Table, dataset_uri: str) -> list[str]:
    """Write ``rows`` (already in the dataset's schema) as uncommitted fragments; their metadata as JSON."""
    if rows.num_rows == 0:
        return []
    rows = _unsliced(rows)
    fragments = lance.fragment.write_fragments(rows, dataset_uri, schema=rows.schema, mode="append")
    return [json.dumps(f.to_json()) for f in fragments]


def _rows_to_replace(dataset: lance.LanceDataset, uuids: Sequence[str]) -> dict[int, list[str]]:
    """{fragment id: uuids in it} for the incoming ``uuids`` already in ``dataset`` (one scan of ``uuid``)."""
    if dataset.count_rows() == 0:
        return {}
    table = dataset.to_table(columns=["uuid"], with_row_address=True)
    hits = pc.is_in(table["uuid"], value_set=pa.array(list(uuids), pa.string()))
    found = table.filter(hits)
    fragment_ids = np.right_shift(found["_rowaddr"].to_numpy(), 32)
    out: dict[int, list[str]] = {}
    for fragment_id, value in zip(fragment_ids.tolist(), found["uuid"].to_pylist()):
        out.setdefault(int(fragment_id), []).append(value)
    return out


def commit_fragments(dataset_uri: str, fragments_json: Sequence[str], uuids: Sequence[str]) -> FragmentCommit:
    """Commit the worker-written fragments holding ``uuids`` in ONE version, replacing existing rows by uuid.

    ``uuids`` must be unique (a repeat would leave two rows with one key; checked before anything is committed).
    """
    if len(set(uuids)) != len(uuids):
        raise StoreError(f"{len(uuids) - len(set(uuids))} repeated uuid(s) among the rows to commit")
    fragments = [FragmentMetadata.from_json(text) for text in fragments_json]
    for attempt in range(COMMIT_ATTEMPTS):
        dataset = lance.dataset(dataset_uri)
        if not fragments:
            return FragmentCommit(0, 0, dataset.version)
        replace = _rows_to_replace(dataset, uuids)
        try:
            committed = lance.LanceDataset.commit(dataset_uri, _operation(dataset, fragments, replace),
                                                  read_version=dataset.version)
        except (OSError, ValueError, RuntimeError) as exc:
            if "conflict" not in str(exc).lower() or attempt == COMMIT_ATTEMPTS - 1:
                raise
            time.sleep(random.uniform(0.05, 0.2 * 2**attempt))  # another writer deleted from the same fragments
            continue
        replaced = sum(len(v) for v in replace.values())
        return FragmentCommit(len(uuids) - replaced, replaced, committed.version)
    raise AssertionError("unreachable")


def _operation(dataset: lance.LanceDataset, fragments: list[FragmentMetadata],
               replace: dict[int, list[str]]) -> lance.LanceOperation.BaseOperation:
    """``Append`` of ``fragments``, or an ``Update`` that also deletes the ``replace`` rows from their fragments."""
    if not replace:
        return lance.LanceOperation.Append(fragments)
    removed, updated = [], []
    for fragment_id, values in replace.items():
        kept = dataset.get_fragment(fragment_id).delete(sql.in_list("uuid", values))
        (removed.append(fragment_id) if kept is None else updated.append(kept))
    return lance.LanceOperation.Update(removed_fragment_ids=removed, updated_fragments=updated,
                                       new_fragments=fragments)


def dataset_version(dataset_uri: str) -> int:
    """The latest version of the Lance dataset at ``dataset_uri``."""
    return lance.dataset(dataset_uri).version


def ray_read_lance(dataset_uri: str, columns: Sequence[str], version: int | None = None,
                   where: str | None = None) -> "ray.data.Dataset":
    """A Ray Data dataset over ``columns`` of one version of a Lance dataset, optionally filtered (Lance SQL).

    Read tasks reserve no CPU (Lance decodes on its own I/O threads): when reads hold a CPU and an actor sits on
    every other one, Ray Data waits for a free CPU forever (measured: a hang with 2 actors on 2 CPUs)."""
    import ray.data

    return ray.data.read_lance(dataset_uri, version=version, columns=list(columns), filter=where, num_cpus=0)


def read_predictions(dataset_uri: str) -> pa.Table:
    """Every row of a predictions table (small tables and tests; stream larger ones with ``lance``)."""
    return lance.dataset(dataset_uri).to_table()

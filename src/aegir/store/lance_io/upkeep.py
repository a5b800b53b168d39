"""Upkeep of a Lance table (``aegir dataset optimize``): compaction, indexes, old versions, orphaned files.

Versions a model was trained on must outlive any retention: a checkpoint names the ``training_data`` version it
read (lineage), and a flywheel round's model is such a checkpoint. :func:`keep_version` tags a version
(``keep-v<N>``); training tags the version it reads, and :func:`optimize_table` tags the versions it is told to keep
before it prunes. Lance never removes a tagged version, whatever its age.

One :func:`optimize_table` call:

1. builds the BTREE indexes a table lacks and folds rows written since into the existing ones
   (``optimize_indices``): one version per missing index plus one;
2. compacts small fragments (each build batch and each commit of a Ray build is a fragment) and materialises
   deletions: one new version when there was anything to compact (Lance compacts only fragments that the indexes
   cover alike, hence indexes first);
3. removes versions older than ``older_than`` that carry no tag, with the data and index files only they used;
   with ``remove_orphans``, also files no version references (the fragments of a Ray build whose driver died
   before its commit) whatever their age — only safe while no other process writes to the table.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Iterable

import lance
import lancedb

from aegir.store.lance_io.schema import StoreError
from aegir.store.lance_io.table import ensure_scalar_indexes

KEEP_TAG_PREFIX = "keep-v"


@dataclass
class TableUpkeep:
    """What :func:`optimize_table` did: version / fragment counts before → after, versions kept by tag,
    indexes (re)built, versions and bytes removed."""

    location: str
    rows: int
    versions_before: int
    versions_after: int
    fragments_before: int
    fragments_after: int
    latest_version: int
    kept_versions: list[int] = field(default_factory=list)
    indexes_built: list[str] = field(default_factory=list)
    versions_removed: int = 0
    bytes_removed: int = 0


def keep_version(dataset_uri: str, version: int) -> str:
    """Tag ``version`` of the Lance dataset at ``dataset_uri`` as ``keep-v<version>`` (no-op when tagged); the
    tag name. A StoreError when the version does not exist."""
    dataset = lance.dataset(dataset_uri)
    tag = f"{KEEP_TAG_PREFIX}{int(version)}"
    if tag in dataset.tags.list():
        return tag
    if int(version) not in {int(v["version"]) for v in dataset.versions()}:
        raise StoreError(f"{dataset_uri}: no version {version} to keep (it may have been removed already)")
    try:
        dataset.tags.create(tag, int(version))
    except (ValueError, OSError) as exc:
        if tag not in lance.dataset(dataset_uri).tags.list():  # not just another process tagging it first
            raise StoreError(f"{dataset_uri}: cannot tag version {version}: {exc}") from exc
    return tag


def kept_versions(dataset_uri: str) -> list[int]:
    """The versions tagged ``keep-v<N>``, ascending."""
    tags = lance.dataset(dataset_uri).tags.list()
    return sorted(int(info["version"]) for name, info in tags.items() if name.startswith(KEEP_TAG_PREFIX))


def optimize_table(table: lancedb.table.Table, older_than: dt.timedelta, keep: Iterable[int] = (),
                   remove_orphans: bool = False) -> TableUpkeep:
    """Compact ``table``, bring its indexes up to date, tag the ``keep`` versions and remove untagged versions
    older than ``older_than`` (zero: every untagged version but the latest)."""
    if older_than < dt.timedelta(0):
        raise ValueError(f"older_than must be >= 0, got {older_than}")
    uri = table.to_lance().uri
    before = lance.dataset(uri)
    report = TableUpkeep(uri, before.count_rows(), len(before.versions()), 0, len(before.get_fragments()), 0, 0)
    for version in sorted(set(keep)):
        keep_version(uri, version)
    if report.rows:  # indexes first: Lance compacts only fragments an index covers alike
        report.indexes_built = ensure_scalar_indexes(table, missing_only=True)
        try:
            lance.dataset(uri).optimize.optimize_indices()
        except (OSError, ValueError, RuntimeError):
            # pylance 14 cannot fold updated rows into a nested-field index ("No column with name dataset"):
            # rebuild the stale indexes in full instead (one version each)
            table.checkout_latest()
            report.indexes_built += ensure_scalar_indexes(table)
        lance.dataset(uri).optimize.compact_files()
    stats = lance.dataset(uri).cleanup_old_versions(older_than=older_than, delete_unverified=remove_orphans,
                                                    error_if_tagged_old_versions=False)
    after = lance.dataset(uri)
    report.versions_removed, report.bytes_removed = int(stats.old_versions), int(stats.bytes_removed)
    report.versions_after, report.fragments_after = len(after.versions()), len(after.get_fragments())
    report.latest_version, report.kept_versions = after.version, kept_versions(uri)
    if after.count_rows() != report.rows:
        raise StoreError(f"{uri}: {report.rows} rows before upkeep, {after.count_rows()} after")  # never expected
    return report

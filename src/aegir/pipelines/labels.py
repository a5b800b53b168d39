"""Label jobs (``aegir labels import|list``, ``aegir prompts export``): label files → DuckLake, DuckLake →
prompts."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from aegir.config import Settings
from aegir.pipelines import run_stage
from aegir.store import ducklake
from aegir.store.label_files import read_label_file



@dataclass(frozen=True)
class ImportReport:
    """Outcome of one ``aegir labels import``: counts, the quarantined reasons and the new snapshot."""

    dataset: str
    source_file: str
    rows_read: int
    commit: ducklake.ImportCommit
    problems: dict[int, str]


def import_labels(
    settings: Settings,
    path: str | Path,
    dataset: str,
    crs: str | None = None,
    lon_col: str | None = None,
    lat_col: str | None = None,
    doi: str | None = None,
) -> ImportReport:
    """Read a label file, normalise it (EPSG:4326, valid, geodesic area, S2/H3) and write it in one transaction."""
    ducklake.label_table_name(dataset)  # validate the name before any work
    source = read_label_file(path, crs=crs, lon_col=lon_col, lat_col=lat_col)
    result = run_stage(
        "label_import",
        ["label_rows", "quarantine_rows", "geometry_problems"],
        {
            "label_source": source,
            "dataset_name": dataset,
            "s2_levels": ducklake.LABEL_S2_LEVELS,  # the label tables' fixed cell columns
            "h3_resolution": ducklake.LABEL_H3_RESOLUTION,
            "imported_at": dt.datetime.now(dt.timezone.utc),
            "doi": doi,
        },
    )
    con = ducklake.connect(settings)
    try:
        commit = ducklake.write_label_batch(con, settings, dataset, result["label_rows"], result["quarantine_rows"])
    finally:
        con.close()
    return ImportReport(dataset, str(source.path), len(source.frame), commit, result["geometry_problems"])


def list_datasets(settings: Settings) -> list[dict]:
    """Label datasets in the lakehouse with row counts and the current snapshot id."""
    con = ducklake.connect(settings)
    try:
        return ducklake.dataset_summaries(con, settings)
    finally:
        con.close()


def read_labels(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Label rows matching ``query`` (columns ``ducklake.LABEL_COLUMNS``), read from the lakehouse."""
    con = ducklake.connect(settings)
    try:
        return ducklake.query_labels(con, settings, query)
    finally:
        con.close()


def build_prompts(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Prompts (uuid, dataset, WKB geometry EPSG:4326, bbox, centroid, S2, H3) for the labels matching ``query``."""
    return run_stage("prompts", ["prompts"], {"label_records": read_labels(settings, query)})["prompts"]

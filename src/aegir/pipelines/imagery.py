"""Imagery jobs (``aegir imagery register|list``, ``aegir prompts export --with-imagery``): image files → the
lakehouse ``imagery`` catalog; lakehouse labels × catalog → prompts in each image's pixel grid.

Registration reads headers only (no pixels), hashes each file (``image_id``), runs the ``imagery_catalog`` DAG and
writes catalog rows and quarantined files in one DuckLake transaction. The join reads the labels of a query, runs
the ``label_image_join`` DAG's first pass (the cells each label touches), the store's spatial join, and the second
pass (prompts in pixel coordinates).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from aegir.config import Settings
from aegir.pipelines import run_stage
from aegir.store import ducklake, image_files
from aegir.store.imagery_files import ImageHeader, ImageryError, image_headers
from aegir.utils import radiometry


@dataclass(frozen=True)
class RegisterReport:
    """Outcome of ``aegir imagery register``: catalog rows written and every quarantined file with its reason."""

    dataset: str
    seen: int
    commit: ducklake.ImageryCommit
    quarantined: list[dict]


@dataclass(frozen=True)
class JoinResult:
    """Prompts of a label query on the catalogued imagery, the labels that met no image, the snapshot read."""

    prompts: pa.Table
    catalog: pa.Table
    labels: pa.Table
    without_imagery: dict[str, int]
    snapshot_id: int
    stats: dict[str, Any] = field(default_factory=dict)


def _quarantine_table(items: list[dict], dataset: str, when: dt.datetime) -> pa.Table:
    return pa.table({"uri": pa.array([i["file"] for i in items], pa.string()),
                     "reason": pa.array([i["reason"] for i in items], pa.string()),
                     "dataset": pa.array([dataset] * len(items), pa.string()),
                     "quarantined_at": pa.array([when] * len(items), pa.timestamp("us", tz="UTC"))})


def register_imagery(settings: Settings, paths: Sequence[str | Path], dataset: str,
                     allow_pixel_grid: bool = False, truth_masks: str | Path | None = None,
                     processing_baseline: str | None = None, progress: Any = None) -> RegisterReport:
    """Catalog every image under ``paths`` as ``dataset`` (see the module docstring); idempotent.

    ``truth_masks``: a folder of pixel ground-truth masks matched by file stem (stored as ``truth_uri``);
    ``processing_baseline``: for Sentinel-2 products whose metadata does not carry one.
    """
    ducklake.label_table_name(dataset)  # the same naming rule as label datasets
    if processing_baseline is not None:
        try:
            processing_baseline = radiometry.baseline_text(processing_baseline)
        except radiometry.RadiometryError as exc:
            raise ValueError(f"--processing-baseline: {exc}") from exc
    truth = image_files.mask_files_by_stem(truth_masks) if truth_masks else {}
    headers: list[ImageHeader] = []
    quarantined: list[dict] = []
    seen_ids: dict[str, str] = {}
    for path in paths:
        for item in image_headers(str(path), allow_pixel_grid, truth, processing_baseline):
            if progress:
                progress(1)
            if isinstance(item, ImageryError):
                file, _, reason = str(item).partition(": ")
                quarantined.append({"file": file, "reason": reason or file})
            elif item.image_id in seen_ids:
                quarantined.append({"file": item.uri, "reason": f"{item.uri}: same content as {seen_ids[item.image_id]}"
                                                                " (registered once)"})
            else:
                seen_ids[item.image_id] = item.uri
                headers.append(item)
    now = dt.datetime.now(dt.UTC)
    rows = run_stage("imagery_catalog", ["imagery_rows"], {
        "image_headers": headers, "dataset_name": dataset, "s2_levels": tuple(settings.s2_levels),
        "registered_at": now})["imagery_rows"]
    con = ducklake.connect(settings)
    try:
        commit = ducklake.write_imagery(con, settings, rows, _quarantine_table(quarantined, dataset, now))
    finally:
        con.close()
    return RegisterReport(dataset, len(headers) + len(quarantined), commit, quarantined)


def list_imagery(settings: Settings, dataset: str | None = None) -> pa.Table:
    """Catalog rows (all or one dataset's) without the bulky cover list."""
    con = ducklake.connect(settings)
    try:
        rows = ducklake.read_imagery(con, settings, dataset=dataset)
    finally:
        con.close()
    return rows.drop_columns([c for c in ("s2_cover", "footprint_wkb", "extras_json") if c in rows.column_names])


def list_quarantined_imagery(settings: Settings) -> pa.Table:
    """Quarantined imagery files with their reasons."""
    con = ducklake.connect(settings)
    try:
        return ducklake.read_imagery_quarantine(con, settings)
    finally:
        con.close()


def join_labels_to_imagery(settings: Settings, query: ducklake.LabelQuery,
                           imagery_datasets: Sequence[str] = (), image_assignment: str = "all") -> JoinResult:
    """Every label of ``query`` with the catalogued images it meets (``all``) or its ``best`` image (see
    :func:`aegir.dataflows.label_image_join.assigned_pairs`), as prompts in each image's pixel grid."""
    import time

    con = ducklake.connect(settings)
    try:
        snapshot = ducklake.current_snapshot_id(con, settings)
        labels = ducklake.query_labels(con, settings, query)
        start = time.perf_counter()
        first = run_stage("label_image_join", ["label_cover_cells", "label_geometry_table"],
                          {"label_records": labels})
        pairs = ducklake.label_image_pairs(con, settings, first["label_cover_cells"], first["label_geometry_table"],
                                           imagery_datasets)
        join_s = time.perf_counter() - start
        catalog = ducklake.read_imagery(con, settings, sorted(set(pairs["image_id"].to_pylist())))
    finally:
        con.close()
    second = run_stage("label_image_join", ["image_prompts", "labels_without_imagery"], {
        "label_records": labels, "label_image_pairs": pairs, "catalog_images": catalog,
        "image_assignment": image_assignment})
    stats = {"labels": labels.num_rows, "pairs": pairs.num_rows, "join_seconds": round(join_s, 3),
             "images": catalog.num_rows}
    return JoinResult(second["image_prompts"], catalog, labels, second["labels_without_imagery"], snapshot, stats)

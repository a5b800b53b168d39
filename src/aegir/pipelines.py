"""Hamilton driver wrapper: which dataflow modules make which outputs, and the jobs the CLI calls.

Each job reads through the store layer, runs a Hamilton DAG of pure functions, and writes through the store
layer. Dataflows never open connections: they receive data (or a connection) as an input node.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

import pyarrow as pa
from hamilton import base, driver

from aegir.config import Settings
from aegir.dataflows import ingest_ducklake_labels, label_import, s2_indexing
from aegir.store import ducklake
from aegir.store.label_files import read_label_file

H3_RESOLUTION = 12

STAGES: dict[str, tuple[ModuleType, ...]] = {
    "label_import": (label_import, s2_indexing),
    "prompts": (ingest_ducklake_labels,),
}


def build_driver(modules: Sequence[ModuleType], config: dict[str, Any] | None = None) -> driver.Driver:
    """A Hamilton driver over ``modules`` whose ``execute`` returns a dict of the requested outputs."""
    return (
        driver.Builder()
        .with_modules(*modules)
        .with_config(config or {})
        .with_adapters(base.DictResult())
        .build()
    )


def run_stage(stage: str, outputs: Iterable[str], inputs: dict[str, Any]) -> dict[str, Any]:
    """Execute ``outputs`` of one named stage with ``inputs``; returns {output name: value}."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return build_driver(STAGES[stage]).execute(list(outputs), inputs=inputs)


def write_dag_image(path: str | Path, stages: Sequence[str] | None = None) -> Path:
    """Write the DAG of ``stages`` (all by default): ``.dot`` as Graphviz source, other suffixes rendered by ``dot``.

    Needs the ``graphviz`` Python package (extra ``dag``); rendering also needs the Graphviz ``dot`` binary.
    """
    try:
        import graphviz
    except ImportError as exc:
        raise RuntimeError("`aegir dag` needs graphviz: pip install 'aegir-lightning-lance[dag]'") from exc
    modules = sorted({m for name in (stages or STAGES) for m in STAGES[name]}, key=lambda m: m.__name__)
    digraph = build_driver(modules).display_all_functions()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".dot":
        path.write_text(digraph.source)
        return path
    try:
        rendered = digraph.render(outfile=path, cleanup=True)
    except graphviz.ExecutableNotFound as exc:
        raise RuntimeError(
            f"cannot render {path}: the Graphviz `dot` program is not installed (apt-get install graphviz); "
            "write a .dot file instead"
        ) from exc
    return Path(rendered)


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
            "s2_levels": settings.s2_levels,
            "h3_resolution": H3_RESOLUTION,
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


def build_prompts(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Prompts (uuid, dataset, WKB geometry EPSG:4326, bbox, centroid, S2, H3) for the labels matching ``query``."""
    con = ducklake.connect(settings)
    try:
        return run_stage(
            "prompts",
            ["prompts"],
            {"ducklake_connection": con, "settings": settings, "label_query": query},
        )["prompts"]
    finally:
        con.close()

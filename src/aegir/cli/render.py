"""Tables and report lines the commands print (rich); no command logic here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from aegir.cli.common import console, errors


def print_import_report(report: Any) -> None:
    """One line per label import (rows read / new / already present / quarantined) and up to 10 row warnings."""
    commit = report.commit
    console.print(
        f"[bold]{report.dataset}[/]: read {report.rows_read} rows from {report.source_file} → "
        f"{commit.inserted} new, {commit.already_present} already present, {len(report.problems)} quarantined "
        f"({commit.table}, snapshot {commit.snapshot_id})",
        highlight=False,
    )
    for row, reason in sorted(report.problems.items())[:10]:
        errors.print(f"[yellow]warning:[/] {report.source_file} row {row}: {reason}", highlight=False)
    if len(report.problems) > 10:
        errors.print(f"[yellow]warning:[/] … {len(report.problems) - 10} more; see `aegir labels quarantine`")


def print_build_report(report: Any) -> None:
    """A dataset build's summary line plus one line per skipped file / prompt (on stderr)."""
    console.print(f"{report.location}: {report.inserted} inserted, {report.updated} updated, version {report.version}",
                  highlight=False)
    for item in report.skipped:
        errors.print(f"[yellow]skipped:[/] {item.get('file') or item.get('prompt')}: {item['reason']}", highlight=False)


def print_skipped(skipped: list[dict]) -> None:
    """``skipped: <file>[ prompt <id>]: <reason>`` on stderr for each skipped input."""
    for item in skipped:
        what = f" prompt {item['prompt']}" if "prompt" in item else ""
        reason = str(item["reason"]).removeprefix(f"{what.strip()}: ") if what else item["reason"]
        errors.print(f"[yellow]skipped:[/] {item.get('file', '')}{what}: {reason}", highlight=False)


def datasets_table(summaries: list[dict]) -> Table:
    """Lakehouse label sets: dataset, table, rows, quarantined, files, snapshot."""
    table = Table("dataset", "table", "rows", "quarantined", "files", "snapshot")
    for s in summaries:
        table.add_row(s["dataset"], s["table"], str(s["rows"]), str(s["quarantined"]), str(s["source_files"]),
                      str(s["snapshot_id"]))
    return table


def field_table(values: dict) -> Table:
    """A two-column field | value table."""
    table = Table("field", "value")
    for key, value in values.items():
        table.add_row(key, str(value))
    return table


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def flywheel_rounds_table(rounds: list[dict]) -> Table:
    """One line per flywheel round: training rows, quality on truth the loop never reads, target detections
    ("accepted on true PV": the accepted candidates' share on target truth, scored after the gate; region: the
    target images without truth)."""
    view = Table("round", "rows", "pseudo +/−", "epochs", "seed-test IoU", "seed-test obj. F1", "target IoU",
                 "target obj. P/R/F1", "transfer box P/R/F1", "detections", "accepted", "accepted on true PV",
                 "region accepted share",
                 "region kept/added/dropped", "windows admitted +/−", "version")
    for row in rounds:
        changes = "—" if row.get("kept") is None else f"{row['kept']}/{row['added']}/{row['dropped']}"
        view.add_row(*map(str, (
            row["round"], row["rows"], f"{row['pseudo_positive']}/{row['pseudo_negative']}",
            f"{row['epochs']}" + ("" if row.get("promoted", True) else " (kept k−1)"),
            _score(row["seed_test_iou"]), _score(row["seed_test_object_f1"]), _score(row["target_iou"]),
            "/".join(_score(row[k]) for k in ("target_object_precision", "target_object_recall", "target_object_f1")),
            "/".join(_score(row[k]) for k in ("transfer_precision", "transfer_recall", "transfer_f1")),
            row["detections"], row["accepted"], _score(row.get("accepted_precision")),
            _score(row.get("accepted_share")), changes,
            f"{row['admitted_positive']}/{row['admitted_negative']}", row["data_version"])))
    return view


def print_wide(table: Table, width: int = 210) -> None:
    """Print ``table`` at least ``width`` columns wide (one line per row on any terminal)."""
    Console(width=max(console.width, width), file=console.file).print(table)


def chip_neighbours_table(result: dict) -> Table:
    """Nearest training chips: rank, cosine distance, uuid, sample id, dataset, level-13 S2 token."""
    view = Table("rank", "distance", "uuid", "sample_id", "dataset", "s2_token_l13",
                 title=f"{result['search']} search, model {result['model']}")
    for rank, hit in enumerate(result["neighbours"], 1):
        view.add_row(str(rank), f"{hit['distance']:.5f}", hit["uuid"], str(hit["sample_id"]), str(hit["dataset"]),
                     str(hit["s2_token_l13"]))
    return view


def tile_neighbours_table(result: dict) -> Table:
    """Nearest region windows: rank, cosine distance, tile, window column/row, S2 cell."""
    view = Table("rank", "distance", "tile", "col", "row", "cell", title=f"model {result['model']}")
    for rank, hit in enumerate(result["neighbours"], 1):
        view.add_row(str(rank), f"{hit['distance']:.5f}", Path(hit["tile_path"]).name, str(hit["window_col"]),
                     str(hit["window_row"]), hit["cell_token"])
    return view


def imagery_table(rows: Any, quarantine: bool = False) -> Table:
    """The imagery catalog (or its quarantine) as a table."""
    if quarantine:
        table = Table("file", "dataset", "reason", "when")
        for row in rows.to_pylist():
            table.add_row(row["uri"], row["dataset"], row["reason"], str(row["quarantined_at"])[:19])
        return table
    table = Table("image_id", "dataset", "file", "px", "GSD m", "CRS", "sensor", "georef", "truth")
    for row in rows.to_pylist():
        gsd = "—" if row["gsd_m"] is None else f"{row['gsd_m']:.3f}"
        table.add_row(row["image_id"][:12], row["dataset"], Path(row["uri"]).name, f"{row['width']}×{row['height']}",
                      gsd, row["crs"] or "pixel grid", row["sensor"],
                      "file" if row["georeferenced"] else row["grid_convention"], "yes" if row["truth_uri"] else "")
    return table


def lineage_table(lineage: dict) -> Table:
    """One row's lineage and its build record as a field | value table."""
    values = {k: v for k, v in lineage.items() if k not in ("lineage", "build")}
    for key, value in (lineage.get("lineage") or {}).items():
        values[f"lineage.{key}"] = value
    for key, value in (lineage.get("build") or {}).items():
        values[f"build.{key}"] = value
    return field_table(values)

"""`aegir flywheel` and `aegir quicklook`: the data flywheel and PNG panels of training_data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir.cli import render
from aegir.cli.common import console, errors, fail, settings_of
from aegir.store import ducklake


def flywheel(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file whose [flywheel] table overrides the shipped defaults (aegir/defaults/flywheel.toml; print them with --show-defaults).")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Rounds after round 0 (the seed-only model); default: the config's.")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: flywheel_state.json (resume), partition.json, flywheel_rounds.csv/json/png, round_<k>/.")] = Path("data/flywheel"),
    show_defaults: Annotated[bool, typer.Option("--show-defaults", help="Print the shipped flywheel.toml and exit.")] = False,
) -> None:
    """Run the data flywheel: round 0 on the labelled seed, then N rounds of gated pseudo-labels and warm-started
    training, each scored on truth the loop never reads; re-running resumes where it stopped."""
    from aegir.pipelines.flywheel import default_config_text, load_flywheel_config, run_flywheel

    if show_defaults:
        console.print(default_config_text(), markup=False, highlight=False)
        return

    def report(round_index: int, step: str, result: dict, skipped: bool) -> None:
        note = "done earlier" if skipped else f"{result.get('seconds', 0):.1f} s"
        errors.print(f"round {round_index} · {step}: {note}", highlight=False)

    try:
        table = run_flywheel(settings_of(ctx), out, load_flywheel_config(config, rounds=rounds), on_step=report)
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        fail(str(exc))
    render.print_wide(render.flywheel_rounds_table(table))  # wide: one line per round
    console.print(f"quicklooks: {out / 'round_<k>' / 'quicklooks'}", highlight=False)
    console.print(f"per-round table: {out / 'flywheel_rounds.csv'}", highlight=False)


def quicklook(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for <sample_id>.png panels and contact_sheet.png.")] = Path("data/quicklooks/training_data"),
    uri: Annotated[Optional[str], typer.Option(help="training_data table location (default: under the LanceDB root).")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Only rows of these datasets.")] = None,
    mask_source: Annotated[Optional[list[str]], typer.Option(help="Only rows whose mask came from these sources.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 16,
) -> None:
    """PNG panels of training_data chips: the chip with its prompt outlined | the mask overlay."""
    from aegir.pipelines.quicklook import quicklook_training_data

    filters = {}
    if dataset:
        filters["metadata.dataset"] = list(dataset)
    if mask_source:
        filters["metadata.mask_source"] = list(mask_source)
    try:
        report = quicklook_training_data(settings_of(ctx), uri, out, filters, limit)
    except (ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(report['written'])} quicklooks and {report['contact_sheet']}", highlight=False)

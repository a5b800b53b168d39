"""`aegir imagery …`: the lakehouse catalog of image footprints that labels find their imagery through."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress

from aegir.cli import render
from aegir.cli.common import console, errors, fail, settings_of
from aegir.pipelines import imagery as imagery_jobs
from aegir.store import ducklake

imagery_app = typer.Typer(help="The imagery catalog in the lakehouse.", no_args_is_help=True)


@imagery_app.command("register")
def imagery_register(
    ctx: typer.Context,
    paths: Annotated[list[str], typer.Argument(help="GeoTIFF/COG/PNG/BMP files, folders (recursive), STAC catalog JSON, EarthView Parquet shards, Sentinel-2 band folders.")],
    dataset: Annotated[str, typer.Option(help="Catalog dataset name (lower-case letters, digits, _).")] = "imagery",
    truth_masks: Annotated[Path | None, typer.Option(help="Folder of pixel ground-truth masks matched by file stem.")] = None,
    allow_pixel_grid: Annotated[bool, typer.Option("--allow-pixel-grid", help="Keep images without any georeference on a bare pixel grid instead of quarantining them.")] = False,
    processing_baseline: Annotated[str | None, typer.Option(help="Sentinel-2: processing baseline (NN.NN) when the product metadata has none.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Register images (idempotent: same file → same row); unusable files are quarantined with the reason."""
    try:
        with Progress(console=errors, transient=True) as bar:
            task = bar.add_task("registering imagery", total=None)
            report = imagery_jobs.register_imagery(
                settings_of(ctx), paths, dataset, allow_pixel_grid, truth_masks, processing_baseline,
                lambda n: bar.advance(task, n))
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps({"dataset": report.dataset, "seen": report.seen, **vars(report.commit),
                          "quarantined_files": report.quarantined}))
        return
    commit = report.commit
    console.print(f"imagery/{report.dataset}: {commit.inserted} registered, {commit.already_present} already present, "
                  f"{commit.replaced} replaced (content changed), {len(report.quarantined)} quarantined; "
                  f"snapshot {commit.snapshot_id}", highlight=False)
    render.print_skipped([{"file": q["file"], "reason": q["reason"]} for q in report.quarantined])


@imagery_app.command("list")
def imagery_list(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help="Only this catalog dataset.")] = None,
    quarantine: Annotated[bool, typer.Option("--quarantine", help="List quarantined files instead.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (one object per image).")] = False,
) -> None:
    """Catalogued images: id, dataset, size, GSD, CRS, sensor, time, georeference, truth."""
    try:
        rows = (imagery_jobs.list_quarantined_imagery(settings_of(ctx)) if quarantine
                else imagery_jobs.list_imagery(settings_of(ctx), dataset))
    except ducklake.StoreError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(rows.to_pylist(), default=str))
        return
    console.print(render.imagery_table(rows, quarantine))

"""`aegir plan …`: national S2 grid plans (cover, rank, store a ledger), their workers and their status."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir.cli.common import console, errors, fail, settings_of
from aegir.store import ducklake

plan_app = typer.Typer(help="National plans: an AOI or a country covered by S2 cells, ranked by the lakehouse, "
                            "stored as a lease ledger in DuckLake (grid_plan).")


def _default_plan_id(aoi: str, level: int) -> str:
    """``<name>-<hash>-l<level>``: readable from the AOI's name, unique by a hash of the whole AOI argument (two
    bboxes or files with the same stem never share a plan)."""
    path = Path(aoi)
    stem = path.stem if path.is_file() else aoi
    digest = hashlib.sha1(str(path.resolve() if path.is_file() else aoi).encode()).hexdigest()[:8]
    return f"{re.sub(r'[^a-z0-9]+', '-', stem.lower()).strip('-')[:40] or 'aoi'}-{digest}-l{level}"


@plan_app.callback(invoke_without_command=True)
def plan(
    ctx: typer.Context,
    aoi: Annotated[Optional[str], typer.Option(help="AOI: a vector/WKT/bbox file, a bbox min_lon,min_lat,max_lon,max_lat, or a country name / ISO code (looked up in --boundaries).")] = None,
    level: Annotated[int, typer.Option(help="S2 level of the work cells (14 ≈ 0.3 km², ~1.3e6 cells for Germany).")] = 14,
    plan_id: Annotated[Optional[str], typer.Option(help="Plan id (default: <aoi>-l<level>); re-planning keeps statuses.")] = None,
    label_dataset: Annotated[Optional[list[str]], typer.Option(help="Label dataset(s) ranking the cells (default: all); repeatable.")] = None,
    context_level: Annotated[Optional[int], typer.Option(help="S2 level of a cell's neighbourhood (default: level - 4).")] = None,
    builtup: Annotated[Optional[Path], typer.Option(help="Parquet/CSV of cell_token, builtup in [0, 1] (tokens at the plan level or coarser).")] = None,
    boundaries: Annotated[Optional[Path], typer.Option(help="Country polygons (vector file with a name / ISO code column) for a NAME AOI (default: Natural Earth 1:110m shipped in pyogrio).")] = None,
    chips_per_s: Annotated[Optional[float], typer.Option(help="Measured inference chips/s for the compute estimate.")] = None,
    bench_json: Annotated[Optional[Path], typer.Option(help="A JSON (lines) file with chips_per_s, e.g. `aegir infer region --json` or bench/inference.py output.")] = None,
    chip_px: Annotated[int, typer.Option(help="Model chip side in pixels (estimate; `aegir infer region`'s --tile-px).")] = 1024,
    overlap_px: Annotated[int, typer.Option(help="Overlap of neighbouring chips in pixels (estimate; --overlap-px).")] = 288,
    gsd_m: Annotated[Optional[float], typer.Option(help="Imagery GSD in m/px (estimate; default: median of the imagery catalog).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Cover --aoi with level --level S2 cells, rank them by labels, prior detections and built-up evidence, and
    store the plan as a ledger (pending → running → done/failed/no_imagery) for `aegir plan work`."""
    if ctx.invoked_subcommand is not None:
        return
    if aoi is None:
        fail("--aoi FILE|NAME is required (or a command: `aegir plan work`, `aegir plan status`)")
    from aegir.pipelines import plan as plans
    from aegir.store import plan_files

    settings = settings_of(ctx)
    try:
        geometry, aoi_name = plan_files.read_plan_aoi(aoi, boundaries)
        report = plans.plan_national(settings, plan_id or _default_plan_id(aoi, level), geometry, aoi_name, level,
                                     context_level, tuple(label_dataset or ()),
                                     plan_files.read_builtup(builtup) if builtup else None)
        estimate, why = _estimate(settings, report.area_km2, chips_per_s, bench_json, chip_px, overlap_px, gsd_m)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(asdict(report) | {"estimate_on_paper": asdict(estimate) if estimate else why}))
        return
    _print_report(report)
    _print_estimate(estimate, why)


def _estimate(settings, area_km2: float, chips_per_s: float | None, bench_json: Path | None, chip_px: int,
              overlap_px: int, gsd_m: float | None):
    """(ComputeEstimate or None, why not) from the measured chips/s and the imagery's GSD."""
    from aegir.pipelines import plan as plans
    from aegir.store import plan_files

    source = "--chips-per-s"
    if chips_per_s is None and bench_json is not None:
        chips_per_s, source = plan_files.read_throughput(bench_json)["chips_per_s"], str(bench_json)
    if chips_per_s is None:
        return None, "give --chips-per-s or --bench-json (measured chips/s) for a compute estimate"
    gsd_m = gsd_m if gsd_m is not None else plans.imagery_gsd_m(settings)
    if gsd_m is None:
        return None, "give --gsd-m (the lakehouse has no catalogued imagery with a GSD)"
    return plans.compute_estimate(chips_per_s, chip_px, overlap_px, gsd_m, area_km2, source), ""


def _print_report(report) -> None:
    console.print(f"plan {report.plan_id}: {report.cells:,} level-{report.level} S2 cells ({report.new_cells:,} new) "
                  f"over {report.aoi}, {report.area_km2:,.0f} km²", highlight=False)
    console.print(f"ranked by {report.labels:,} labels ({report.cells_with_labels:,} cells hold one, "
                  f"{report.cells_with_context:,} have one in their level-{report.context_level} neighbourhood) and "
                  f"{report.detections:,} prior detections", highlight=False)
    seconds = report.seconds
    console.print(f"cover {seconds['cover']:.1f} s, rank {seconds['rank']:.1f} s, store {seconds['store']:.1f} s; "
                  f"ledger: " + ", ".join(f"{k} {int(v):,}" for k, v in report.progress.items() if k != "next_expiry_s"),
                  highlight=False)


def _print_estimate(estimate, why: str) -> None:
    if estimate is None:
        console.print(f"estimate on paper: {why}", highlight=False)
        return
    console.print(f"estimate on paper: {estimate.chip_px} px chips ({estimate.overlap_px} px overlap) at "
                  f"{estimate.gsd_m:g} m/px = {estimate.chips_per_km2:,.1f} chips/km²; at {estimate.chips_per_s:g} "
                  f"chips/s ({estimate.source}): {estimate.gpu_hours_per_1000_km2:,.2f} GPU-hours per 1,000 km², "
                  f"{estimate.gpu_hours_aoi:,.0f} GPU-hours for this AOI (inference only: no imagery reads, "
                  f"no empty cells)", highlight=False)


@plan_app.command("work")
def plan_work(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Option(help="The plan to work on.")],
    work: Annotated[str, typer.Option(help="The per-cell work, 'module:function' taking a cell token (importable in fresh processes).")],
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (or Ray tasks).")] = 1,
    batch: Annotated[int, typer.Option(min=1, help="Cells per claim.")] = 1,
    lease_seconds: Annotated[float, typer.Option(help="Lease per claim, renewed every third of it while working.")] = 300.0,
    max_attempts: Annotated[int, typer.Option(min=1, help="An expired cell tried this often fails instead.")] = 3,
    ray_address: Annotated[Optional[str], typer.Option(help="Run the workers as Ray tasks on this cluster ('auto', 'ray://head:10001').")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run as JSON.")] = False,
) -> None:
    """Work the plan's cells with N leasing workers until none is pending or running; exits 1 if cells remain."""
    from aegir.pipelines import plan_workers

    try:
        options = plan_workers.WorkerOptions(batch, lease_seconds, max_attempts)
        if ray_address:
            run = plan_workers.run_ray_workers(settings_of(ctx), plan_id, work, workers, ray_address, options)
        else:
            run = plan_workers.run_local_workers(settings_of(ctx), plan_id, work, workers, options)
    except (ValueError, TypeError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(asdict(run) | {"finished": run.finished}, default=str))
    else:
        done = sum(len(r.done) for r in run.reports)
        failed = sum(len(r.failed) for r in run.reports)
        console.print(f"plan {plan_id}: {len(run.reports)}/{workers} workers finished in {run.seconds:.1f} s; "
                      f"{done:,} cells done, {failed:,} failed now; ledger: "
                      + ", ".join(f"{k} {int(v):,}" for k, v in run.progress.items() if k != "next_expiry_s"),
                      highlight=False)
    for item in run.died:
        errors.print(f"[yellow]worker died:[/] {item}; its cells went back to the others after its lease",
                     highlight=False)
    if not run.finished:
        raise typer.Exit(code=1)


@plan_app.command("status")
def plan_status(
    ctx: typer.Context,
    plan_id: Annotated[str, typer.Option(help="The plan.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Cells per status of a plan."""
    settings = settings_of(ctx)
    try:
        session = ducklake.LedgerSession(settings)
        try:
            with session.attached() as con:
                progress = ducklake.plan_progress(con, settings, plan_id)
        finally:
            session.close()
    except ducklake.StoreError as exc:
        fail(str(exc))
    progress.pop("next_expiry_s", None)
    if not sum(progress.values()):
        fail(f"no grid plan {plan_id!r} in the lakehouse")
    if as_json:
        print(json.dumps(progress))
    else:
        console.print(f"plan {plan_id}: " + ", ".join(f"{k} {int(v):,}" for k, v in progress.items()), highlight=False)

"""`aegir infer …`: tiled inference over resumable S2 grid plans, and tile-window embeddings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from aegir.cli import render
from aegir.cli.common import console, errors, fail, settings_of
from aegir.store import ducklake

infer_app = typer.Typer(help="Inference over regions: resumable S2 grid plans of tiles.", no_args_is_help=True)


@infer_app.command("region")
def infer_region(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    out: Annotated[Path, typer.Option(help="Folder for OUT/cells/<token>.tif (probability COGs), OUT/detections.parquet / .gpkg and OUT/installations.parquet / .gpkg.")],
    tiles: Annotated[Optional[str], typer.Option(help="The imagery: a folder or glob of tiles (named PNG/BMP, GeoTIFF/COG, VRT), one raster or mosaic, a COG URL, a STAC catalog (.json), or catalog:<dataset>.")] = None,
    aoi: Annotated[Optional[str], typer.Option(help="AOI: GeoJSON/GPKG/GeoParquet file, a WKT file, or min_lon,min_lat,max_lon,max_lat (default: the tiles' extent).")] = None,
    plan_level: Annotated[int, typer.Option(help="S2 level of the work cells (14 ≈ 600 m, 15 ≈ 300 m).")] = 14,
    tile_px: Annotated[int, typer.Option(help="Model tile size in pixels.")] = 1024,
    overlap_px: Annotated[int, typer.Option(help="Overlap of neighbouring model tiles in pixels (blended).")] = 288,
    margin_px: Annotated[Optional[int], typer.Option(help="Pixels at each inner tile edge left out of the blend (truncated CNN context), < overlap / 2 (default: (overlap - 64) / 2).")] = None,
    threshold: Annotated[float, typer.Option(help="PV probability threshold of a detection.")] = 0.5,
    gap_m: Annotated[float, typer.Option(help="Detections at most this many metres apart form one installation.")] = 5.0,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Model tiles per forward pass, across cells (default: 4 on a GPU, 1 on the CPU, where batching large tiles is slower and costs memory).")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average every tile over its 8 dihedral views (D4; 8× the compute).")] = False,
    decode_workers: Annotated[int, typer.Option(help="Processes decoding named PNG/BMP tiles ahead of the model (0: in the reader thread; GeoTIFF/COG windows are always read there).")] = 0,
    precision: Annotated[str, typer.Option(help="Network precision: auto (bf16 + channels_last on CUDA, fp32 on CPU), fp32, bf16 or fp16.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """PV probabilities, detections and installations over a region, cell by cell; a re-run finishes only what is
    left."""
    from aegir.pipelines.region import infer_region as run_region

    try:
        with Progress(console=errors) as bar:
            task = bar.add_task("cells", total=None)
            report = run_region(settings_of(ctx), checkpoint, out, tiles, aoi, plan_level, tile_px, overlap_px, threshold,
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                device=device, gap_m=gap_m, batch_size=batch_size, tta=tta,
                                precision=precision, margin_px=margin_px,
                                decode_workers=decode_workers)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report) | {"chips_per_s": report.chips_per_s}, default=str))
    else:
        console.print(f"plan {report.plan_id}: {len(report.processed)} cells done now, {len(report.skipped_done)} "
                      f"already done, {len(report.failed)} failed, {len(report.no_imagery)} without imagery; "
                      f"{report.detections} detections in {report.detections_parquet} and {report.detections_gpkg}, "
                      f"{report.installations} installations (gap {report.gap_m:g} m) in "
                      f"{report.installations_parquet} and {report.installations_gpkg} "
                      f"({report.chips_per_s:.1f} chips/s)", highlight=False)
    for item in report.failed:
        errors.print(f"[red]failed:[/] cell {item['cell_token']}: {item['reason']}", highlight=False)
    render.print_skipped(report.tiles_skipped)


@infer_app.command("embed-tiles")
def infer_embed_tiles(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt): its encoder embeds.")],
    tiles: Annotated[Path, typer.Option(help="Folder of region tiles (the imagery `aegir infer region` reads).")],
    plan_level: Annotated[int, typer.Option(help="S2 level of the grid-plan cells recorded per window.")] = 14,
    window_px: Annotated[int, typer.Option(help="Window side in pixels.")] = 256,
    stride_px: Annotated[Optional[int], typer.Option(help="Window step in pixels (default: --window-px).")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per encoder call and commit.")] = 32,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Embed every window of the region tiles into the tile_embeddings table (footprint, S2 cell); idempotent."""
    from aegir.pipelines import embeddings

    try:
        report = embeddings.embed_region_tiles(settings_of(ctx), embeddings.load_encoder(checkpoint, device=device),
                                               tiles, plan_level, window_px, stride_px, batch_size)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report), default=str))
        return
    console.print(f"{report.table}: {report.windows} windows of {report.tiles} tiles in {report.cells} cells "
                  f"(region {report.region}), {report.embedded} embedded, {report.skipped_existing} already present; "
                  f"model {report.model}", highlight=False)

"""`aegir masks …`: the Mask Factory (prompts → PV masks) and mask scoring."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from aegir.cli import render
from aegir.cli.common import console, fail, settings_of
from aegir.pipelines import masks as mask_jobs
from aegir.store import ducklake

masks_app = typer.Typer(help="Mask Factory: prompts → PV masks.", no_args_is_help=True)


@masks_app.command("generate")
def masks_generate(
    ctx: typer.Context,
    images: Annotated[Path, typer.Option(help="Folder of images (BMP, PNG, JPEG, GeoTIFF).")],
    prompts: Annotated[Path, typer.Option(help="CSV filename,xmin,ymin,xmax,ymax (pixels) or GeoJSON/GeoParquet.")],
    out: Annotated[Path, typer.Option(help="Folder for OUT/<image stem>.png (uint8, 0/255).")],
    backend: Annotated[str, typer.Option(help="offline (default, no weights), sam, sam-hq, sam2, model.")] = "offline",
    checkpoint: Annotated[Optional[str], typer.Option(help="sam / sam-hq / model: checkpoint file.")] = None,
    model_type: Annotated[Optional[str], typer.Option(help="sam / sam-hq: vit_h, vit_l, vit_b (sam-hq: vit_tiny); sam2: model id.")] = None,
    polygons: Annotated[Optional[Path], typer.Option(help="Polygons file (.geojson or .parquet); default OUT/mask_polygons.geojson.")] = None,
    lance: Annotated[bool, typer.Option("--lance", help="Also upsert the masks into training_data.generated_mask.")] = False,
    uri: Annotated[Optional[str], typer.Option(help="With --lance: LanceDB table location.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Write one mask per image (union of its prompts) with the chosen backend."""
    from aegir.masks.base import MaskBackendError
    from aegir.masks.prompts import PromptError
    from aegir.store.mask_files import MaskFileError

    options: dict = {}
    if checkpoint:
        options["checkpoint"] = checkpoint
    if model_type:
        options["model_id" if backend == "sam2" else "model_type"] = model_type
    try:
        report = mask_jobs.generate_masks(
            images, prompts, backend, out, options, polygons,
            settings=settings_of(ctx) if lance else None, lance_uri=uri)
    except (MaskBackendError, MaskFileError, PromptError, FileNotFoundError, ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report), default=str))
        return
    console.print(f"{report.backend} ({report.backend_version}): wrote {len(report.written)} masks to {report.out_dir} "
                  f"from {report.prompts_used} prompts; polygons {report.polygons_path}", highlight=False)
    if report.lance:
        console.print(f"training_data: {report.lance}", highlight=False)
    render.print_skipped(report.skipped)


@masks_app.command("evaluate")
def masks_evaluate(
    pred: Annotated[Path, typer.Option(help="Folder of predicted masks.")],
    truth: Annotated[Path, typer.Option(help="Folder of truth masks (PV where value > 0), matched by file stem.")],
) -> None:
    """Print JSON {mean_iou, mean_f1, pixel_iou, per_image, …} of predicted vs truth masks."""
    try:
        result = mask_jobs.evaluate_masks(pred, truth)
    except FileNotFoundError as exc:
        fail(str(exc))
    print(json.dumps(result))

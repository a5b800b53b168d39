"""`aegir train`, `aegir predict`, `aegir evaluate` and `aegir yolo …`: segmentation models on training_data."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from aegir.cli import render
from aegir.cli.common import console, errors, fail, settings_of
from aegir.store import ducklake

yolo_app = typer.Typer(help="YOLO-seg baseline: export training_data to the Ultralytics layout, check, train.",
                       no_args_is_help=True)


def train(
    ctx: typer.Context,
    dataset_uri: Annotated[Optional[str], typer.Option(help="training_data table location (default: training_data under the LanceDB root).")] = None,
    out: Annotated[Path, typer.Option(help="Run folder: best.ckpt, last.ckpt, split.json, logs/, wandb/.")] = Path("runs/train"),
    config: Annotated[Optional[Path], typer.Option("--config", help="Training config (TOML [train] table, JSON or YAML).")] = None,
    max_epochs: Annotated[Optional[int], typer.Option(help="Override the config's max_epochs.")] = None,
    accelerator: Annotated[Optional[str], typer.Option(help="cpu, gpu, auto (CUDA when present).")] = None,
    max_minutes: Annotated[Optional[float], typer.Option(help="Wall-clock cap on fitting; best.ckpt is kept.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Train a segmentation model on training_data (spatially disjoint splits) and write OUT/best.ckpt."""
    from aegir.training.config import TrainConfigError, load_train_config

    settings = settings_of(ctx)
    try:
        train_config = load_train_config(config, max_epochs=max_epochs, accelerator=accelerator,
                                          max_minutes=max_minutes)
    except TrainConfigError as exc:
        fail(str(exc))
    from aegir.training.train import run_training

    try:
        result = run_training(dataset_uri, train_config, out, str(settings.lancedb_root))
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(result)))
        return
    metrics = {k: round(v, 4) for k, v in result.best_metrics.items() if k.startswith("val/")}
    console.print(f"best checkpoint {result.best_checkpoint} (data version {result.data_version}, split "
                  f"{result.split_counts}, {result.epochs} epochs, {result.seconds:.0f} s): {metrics}", highlight=False)


def predict(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    images: Annotated[Path, typer.Option(help="Folder of images (BMP, PNG, JPEG, GeoTIFF).")],
    out: Annotated[Path, typer.Option(help="Folder for OUT/<image stem>.png (uint8 0/255); georeferenced inputs also OUT/geotiff/<stem>.tif.")],
    threshold: Annotated[float, typer.Option(help="PV probability threshold.")] = 0.5,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """Write one PV mask per image with a trained checkpoint."""
    from aegir.pipelines.predict import predict_folder
    from aegir.store.image_files import list_image_files

    try:
        total = len(list_image_files(images))
        with Progress(console=errors) as bar:
            task = bar.add_task("predicting", total=total)
            report = predict_folder(checkpoint, images, out, threshold, device, lambda n: bar.advance(task, n))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    console.print(f"wrote {len(report['written'])} masks to {report['out_dir']} "
                  f"({len(report['geotiff'])} georeferenced GeoTIFFs)", highlight=False)
    render.print_skipped(report["skipped"])


def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    images: Annotated[Path, typer.Option(help="Folder of images (BMP, PNG, JPEG, GeoTIFF).")],
    masks: Annotated[Path, typer.Option(help="Folder of truth masks (PV where value > 0), matched by file stem.")],
    threshold: Annotated[float, typer.Option(help="PV probability threshold.")] = 0.5,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """Print JSON {mean_iou, pixel_iou, f1, precision, recall, per_image, …} of a checkpoint on image + mask pairs."""
    from aegir.pipelines.predict import evaluate_folder

    try:
        result = evaluate_folder(checkpoint, images, masks, threshold=threshold, device=device)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    print(json.dumps(result))


@yolo_app.command("export")
def yolo_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Export folder: images/, labels/, data.yaml, split.json.")],
    dataset_uri: Annotated[Optional[str], typer.Option(help="training_data table location (default: under the LanceDB root).")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Training config: the same split and filters as `aegir train`.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier export in OUT.")] = False,
) -> None:
    """Write training_data as an Ultralytics YOLO segmentation dataset with the spatial split of `aegir train`."""
    from aegir.training.config import TrainConfigError, load_train_config
    from aegir.training.yolo_baseline import export_yolo_dataset

    try:
        report = export_yolo_dataset(dataset_uri, out, load_train_config(config),
                                     str(settings_of(ctx).lancedb_root), overwrite)
    except (TrainConfigError, ValueError, FileExistsError, OSError, ducklake.StoreError) as exc:
        fail(str(exc))
    print(json.dumps(report))


@yolo_app.command("check")
def yolo_check(data_yaml: Annotated[Path, typer.Argument(help="data.yaml of an export.")]) -> None:
    """Run Ultralytics' dataset checker and label verifier on an export (needs the yolo extra)."""
    from aegir.training.yolo_baseline import check_yolo_dataset

    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints progress on stdout
            report = check_yolo_dataset(data_yaml)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    print(json.dumps(report, default=str))
    if not report.get("ok"):
        raise typer.Exit(code=1)


@yolo_app.command("train")
def yolo_train(
    data_yaml: Annotated[Path, typer.Argument(help="data.yaml of an export.")],
    out: Annotated[Path, typer.Option(help="Run folder.")] = Path("runs/yolo"),
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    imgsz: Annotated[int, typer.Option(help="Image size in pixels.")] = 256,
    device: Annotated[str, typer.Option(help="cpu, 0 (first GPU), …")] = "cpu",
) -> None:
    """Train YOLO-seg from its architecture YAML (no download) and print mask mAP on val and test."""
    from aegir.training.yolo_baseline import train_yolo_baseline

    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints progress on stdout
            report = train_yolo_baseline(data_yaml, out, epochs=epochs, imgsz=imgsz, device=device)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    print(json.dumps(report))

"""The ``aegir`` command line: parses arguments, calls a pipeline or store function, prints. No logic here."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from aegir import pipelines
from aegir.config import ConfigError, Settings, load_settings
from aegir.sample_data import SAMPLE_LABEL_SETS
from aegir.store import ducklake
from aegir.store.label_files import LabelFileError

app = typer.Typer(help="Ægir Eider's Lightning Lance: PV segmentation data flywheel.", no_args_is_help=True)
labels_app = typer.Typer(help="PV label sets in the DuckLake lakehouse.", no_args_is_help=True)
prompts_app = typer.Typer(help="Mask Factory prompts from lakehouse labels.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")
app.add_typer(prompts_app, name="prompts")
dataset_app = typer.Typer(help="The LanceDB training_data table.", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")
masks_app = typer.Typer(help="Mask Factory: prompts → PV masks.", no_args_is_help=True)
app.add_typer(masks_app, name="masks")
yolo_app = typer.Typer(help="YOLO-seg baseline: export training_data to the Ultralytics layout, check, train.",
                       no_args_is_help=True)
app.add_typer(yolo_app, name="yolo")

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj["settings"]


def _fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=1)


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[Optional[Path], typer.Option(help="TOML settings file (else $AEGIR_CONFIG).")] = None,
) -> None:
    """Settings come from AEGIR_* environment variables and an optional TOML file."""
    try:
        ctx.obj = {"settings": load_settings(config)}
    except ConfigError as exc:
        _fail(str(exc))


def _print_import(report: pipelines.ImportReport) -> None:
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


@labels_app.command("import")
def labels_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="GeoJSON, Shapefile, GeoPackage, GeoParquet or CSV (lon/lat).")],
    dataset: Annotated[str, typer.Option(help="Dataset name; rows land in raw_<dataset>.")],
    crs: Annotated[Optional[str], typer.Option(help="CRS when the file declares none (e.g. EPSG:2163).")] = None,
    lon_col: Annotated[Optional[str], typer.Option(help="CSV longitude column (auto-detected).")] = None,
    lat_col: Annotated[Optional[str], typer.Option(help="CSV latitude column (auto-detected).")] = None,
    doi: Annotated[Optional[str], typer.Option(help="DOI of the label source.")] = None,
) -> None:
    """Import one label file into raw_<dataset> (idempotent; bad rows go to the quarantine table)."""
    try:
        with console.status(f"importing {path} …"):
            report = pipelines.import_labels(_settings(ctx), path, dataset, crs, lon_col, lat_col, doi)
    except (LabelFileError, ValueError, ducklake.StoreError) as exc:
        _fail(str(exc))
    _print_import(report)


@labels_app.command("import-samples")
def labels_import_samples(ctx: typer.Context) -> None:
    """Import every shared label set under <sample_data_dir>/labels (India, OSM DE/AT, USPVDB, ORNL)."""
    settings = _settings(ctx)
    reports = []
    with Progress(console=console) as progress:
        task = progress.add_task("importing shared label sets", total=len(SAMPLE_LABEL_SETS))
        for item in SAMPLE_LABEL_SETS:
            try:
                reports.append(
                    pipelines.import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)
                )
            except (LabelFileError, ValueError, ducklake.StoreError) as exc:
                _fail(str(exc))
            progress.advance(task)
    for report in reports:
        _print_import(report)


@labels_app.command("list")
def labels_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Datasets in the lakehouse with row counts and the DuckLake snapshot id."""
    try:
        summaries = pipelines.list_datasets(_settings(ctx))
    except ducklake.StoreError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(summaries))
        return
    table = Table("dataset", "table", "rows", "quarantined", "files", "snapshot")
    for s in summaries:
        table.add_row(s["dataset"], s["table"], str(s["rows"]), str(s["quarantined"]), str(s["source_files"]),
                      str(s["snapshot_id"]))
    console.print(table)


@labels_app.command("quarantine")
def labels_quarantine(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows that could not be imported, with file, row number and reason."""
    settings = _settings(ctx)
    con = ducklake.connect(settings)
    try:
        rows = ducklake.quarantine_rows(con, settings, dataset).to_pylist()
    finally:
        con.close()
    if as_json:
        print(json.dumps(rows, default=str))
        return
    for row in rows:
        console.print(f"{row['dataset_name']}  {row['source_file']} row {row['source_row']}: {row['reason']}",
                      highlight=False)


def _label_query(datasets, bbox, s2_prefix, date_from, date_to, limit) -> ducklake.LabelQuery:
    box = None
    if bbox:
        try:
            box = tuple(float(v) for v in bbox.split(","))
        except ValueError:
            box = ()
        if len(box) != 4:
            _fail(f"--bbox {bbox!r} must be min_lon,min_lat,max_lon,max_lat")
    return ducklake.LabelQuery(tuple(datasets or ()), box, s2_prefix, date_from, date_to, limit)


@prompts_app.command("export")
def prompts_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="GeoParquet file to write (EPSG:4326).")],
    dataset: Annotated[Optional[list[str]], typer.Option(help="Dataset(s); all when omitted.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="min_lon,min_lat,max_lon,max_lat (EPSG:4326).")] = None,
    s2_prefix: Annotated[Optional[str], typer.Option(help="S2 token prefix (matched on the level-17 token).")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="Earliest label date (YYYY-MM-DD).")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="Latest label date (YYYY-MM-DD).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many prompts.")] = None,
) -> None:
    """Write Mask Factory prompts (one per label) for the labels matching the filters."""
    from aegir.store.prompt_files import write_prompts_geoparquet

    query = _label_query(dataset, bbox, s2_prefix, date_from, date_to, limit)
    try:
        prompts = pipelines.build_prompts(_settings(ctx), query)
    except (ValueError, ducklake.StoreError) as exc:
        _fail(str(exc))
    write_prompts_geoparquet(prompts, out)
    console.print(f"wrote {prompts.num_rows} prompts to {out}")


def _print_build(report: pipelines.BuildReport, as_json: bool) -> None:
    """A dataset build's outcome: JSON, or a summary line plus one line per skipped file / prompt."""
    if as_json:
        print(json.dumps(vars(report)))
        return
    console.print(f"{report.location}: {report.inserted} inserted, {report.updated} updated, version {report.version}",
                  highlight=False)
    for item in report.skipped:
        errors.print(f"[yellow]skipped:[/] {item.get('file') or item.get('prompt')}: {item['reason']}", highlight=False)


@dataset_app.command("build")
def dataset_build(
    ctx: typer.Context,
    images: Annotated[Optional[Path], typer.Option(help="Folder of image tiles (BMP, PNG, JPEG, GeoTIFF).")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Folder of masks matched by file stem (PV where > 0).")] = None,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    from_lakehouse: Annotated[bool, typer.Option("--from-lakehouse", help="One sample per lakehouse label on a tile of --images.")] = False,
    dataset: Annotated[Optional[list[str]], typer.Option(help="With --from-lakehouse: label dataset(s).")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: min_lon,min_lat,max_lon,max_lat.")] = None,
    s2_prefix: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: S2 token (level ≤ 17).")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: earliest label date.")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: latest label date.")] = None,
    name: Annotated[Optional[str], typer.Option(help="Dataset name stored in the rows (default: from the folder / labels).")] = None,
    chip_size: Annotated[int, typer.Option(help="With --from-lakehouse: chip size in pixels.")] = 256,
    encoding: Annotated[str, typer.Option(help="Chip bytes: raw (fastest), png or tiff.")] = "raw",
    msi: Annotated[Optional[Path], typer.Option(help="Folder of Sentinel-2 band files to cut co-registered MSI chips from.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build (upsert) training_data rows from an image folder (+ masks) or from lakehouse labels."""
    settings = _settings(ctx)
    if images is None:
        _fail("--images DIR is required (the tiles to cut chips from)")
    from aegir.store.image_files import list_image_files

    try:
        total = len(list_image_files(images))
    except FileNotFoundError as exc:
        _fail(str(exc))
    try:
        with Progress(console=errors) as bar:
            task = bar.add_task("building training_data", total=total)
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            if from_lakehouse:
                query = _label_query(dataset, bbox, s2_prefix, date_from, date_to, None)
                report = pipelines.build_dataset_from_lakehouse(
                    settings, query, images, uri, name, chip_size, encoding, str(msi) if msi else None, advance)
            else:
                report = pipelines.build_dataset_from_images(
                    settings, images, masks, uri, name, encoding, str(msi) if msi else None, advance)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    _print_build(report, as_json)


@dataset_app.command("info")
def dataset_info(
    ctx: typer.Context,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows, versions, size, S2 coverage and class balance of a training_data table."""
    try:
        info = pipelines.dataset_info(_settings(ctx), uri)
    except ducklake.StoreError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(info))
        return
    table = Table("field", "value")
    for key, value in info.items():
        table.add_row(key, str(value))
    console.print(table)


@dataset_app.command("build-ray")
def dataset_build_ray(
    ctx: typer.Context,
    images: Annotated[Path, typer.Option(help="Folder of image tiles (BMP, PNG, JPEG, GeoTIFF).")],
    masks: Annotated[Optional[Path], typer.Option(help="Folder of masks matched by file stem (PV where > 0).")] = None,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Dataset name stored in the rows (default: from the folder).")] = None,
    encoding: Annotated[str, typer.Option(help="Chip bytes: raw (fastest), png or tiff.")] = "raw",
    msi: Annotated[Optional[Path], typer.Option(help="Folder of Sentinel-2 band files to cut co-registered MSI chips from.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: auto (this node's `ray start`), ray://head:10001; default: a local Ray.")] = None,
    num_blocks: Annotated[Optional[int], typer.Option(help="Blocks of tiles (default: the cluster's CPUs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build (upsert) training_data rows from an image folder (+ masks) on Ray: workers write, one commit."""
    from aegir.pipelines import ray_scale

    try:
        report = ray_scale.build_dataset_ray(_settings(ctx), images, masks, uri, name, encoding,
                                             str(msi) if msi else None, num_blocks, address)
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        _fail(str(exc))
    _print_build(report, as_json)


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
        report = pipelines.generate_masks(
            images, prompts, backend, out, options, polygons,
            settings=_settings(ctx) if lance else None, lance_uri=uri)
    except (MaskBackendError, MaskFileError, PromptError, FileNotFoundError, ValueError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(vars(report), default=str))
        return
    console.print(f"{report.backend} ({report.backend_version}): wrote {len(report.written)} masks to {report.out_dir} "
                  f"from {report.prompts_used} prompts; polygons {report.polygons_path}", highlight=False)
    if report.lance:
        console.print(f"training_data: {report.lance}", highlight=False)
    for item in report.skipped:
        where = item.get("file", "")
        what = f" prompt {item['prompt']}" if "prompt" in item else ""
        errors.print(f"[yellow]skipped:[/] {where}{what}: {item['reason']}", highlight=False)


@masks_app.command("evaluate")
def masks_evaluate(
    pred: Annotated[Path, typer.Option(help="Folder of predicted masks.")],
    truth: Annotated[Path, typer.Option(help="Folder of truth masks (PV where value > 0), matched by file stem.")],
) -> None:
    """Print JSON {mean_iou, mean_f1, pixel_iou, per_image, …} of predicted vs truth masks."""
    try:
        result = pipelines.evaluate_masks(pred, truth)
    except FileNotFoundError as exc:
        _fail(str(exc))
    print(json.dumps(result))


@app.command("train")
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

    settings = _settings(ctx)
    try:
        train_config = load_train_config(config, max_epochs=max_epochs, accelerator=accelerator,
                                          max_minutes=max_minutes)
    except TrainConfigError as exc:
        _fail(str(exc))
    from aegir.training.train import run_training

    try:
        result = run_training(dataset_uri, train_config, out, str(settings.lancedb_root))
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(vars(result)))
        return
    metrics = {k: round(v, 4) for k, v in result.best_metrics.items() if k.startswith("val/")}
    console.print(f"best checkpoint {result.best_checkpoint} (data version {result.data_version}, split "
                  f"{result.split_counts}, {result.epochs} epochs, {result.seconds:.0f} s): {metrics}", highlight=False)


@app.command("predict")
def predict(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    images: Annotated[Path, typer.Option(help="Folder of images (BMP, PNG, JPEG, GeoTIFF).")],
    out: Annotated[Path, typer.Option(help="Folder for OUT/<image stem>.png (uint8 0/255); georeferenced inputs also OUT/geotiff/<stem>.tif.")],
    threshold: Annotated[float, typer.Option(help="PV probability threshold.")] = 0.5,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """Write one PV mask per image with a trained checkpoint."""
    from aegir.store.image_files import list_image_files
    from aegir.training.evaluate import predict_folder

    try:
        total = len(list_image_files(images))
        with Progress(console=errors) as bar:
            task = bar.add_task("predicting", total=total)
            report = predict_folder(checkpoint, images, out, threshold, device, lambda n: bar.advance(task, n))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"wrote {len(report['written'])} masks to {report['out_dir']} "
                  f"({len(report['geotiff'])} georeferenced GeoTIFFs)", highlight=False)
    for item in report["skipped"]:
        errors.print(f"[yellow]skipped:[/] {item['file']}: {item['reason']}", highlight=False)


@app.command("evaluate")
def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    images: Annotated[Path, typer.Option(help="Folder of images (BMP, PNG, JPEG, GeoTIFF).")],
    masks: Annotated[Path, typer.Option(help="Folder of truth masks (PV where value > 0), matched by file stem.")],
    threshold: Annotated[float, typer.Option(help="PV probability threshold.")] = 0.5,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
) -> None:
    """Print JSON {mean_iou, pixel_iou, f1, precision, recall, per_image, …} of a checkpoint on image + mask pairs."""
    from aegir.training.evaluate import evaluate_folder

    try:
        result = evaluate_folder(checkpoint, images, masks, threshold=threshold, device=device)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
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
                                     str(_settings(ctx).lancedb_root), overwrite)
    except (TrainConfigError, ValueError, FileExistsError, OSError, ducklake.StoreError) as exc:
        _fail(str(exc))
    print(json.dumps(report))


@yolo_app.command("check")
def yolo_check(data_yaml: Annotated[Path, typer.Argument(help="data.yaml of an export.")]) -> None:
    """Run Ultralytics' dataset checker and label verifier on an export (needs the yolo extra)."""
    from aegir.training.yolo_baseline import check_yolo_dataset

    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ultralytics prints progress on stdout
            report = check_yolo_dataset(data_yaml)
    except (ImportError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
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
        _fail(str(exc))
    print(json.dumps(report))


# ---- infer region: tiled inference over a grid plan ------------------------------------------------------------

infer_app = typer.Typer(help="Inference over regions: resumable S2 grid plans of tiles.", no_args_is_help=True)
app.add_typer(infer_app, name="infer")


@infer_app.command("region")
def infer_region(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")],
    out: Annotated[Path, typer.Option(help="Folder for OUT/cells/<token>.tif (probability COGs) and OUT/detections.parquet / .gpkg.")],
    tiles: Annotated[Optional[Path], typer.Option(help="Folder of image tiles (named PNG/BMP, GeoTIFF): the imagery to read.")] = None,
    aoi: Annotated[Optional[str], typer.Option(help="AOI: GeoJSON/GPKG/GeoParquet file, a WKT file, or min_lon,min_lat,max_lon,max_lat (default: the tiles' extent).")] = None,
    plan_level: Annotated[int, typer.Option(help="S2 level of the work cells (14 ≈ 600 m, 15 ≈ 300 m).")] = 14,
    tile_px: Annotated[int, typer.Option(help="Model tile size in pixels.")] = 512,
    overlap_px: Annotated[int, typer.Option(help="Overlap of neighbouring model tiles in pixels (blended).")] = 64,
    threshold: Annotated[float, typer.Option(help="PV probability threshold of a detection.")] = 0.5,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """PV probabilities and detections over a region, cell by cell; a re-run finishes only what is left."""
    from aegir.pipelines.region import infer_region as run_region

    try:
        with Progress(console=errors) as bar:
            task = bar.add_task("cells", total=None)
            report = run_region(_settings(ctx), checkpoint, out, tiles, aoi, plan_level, tile_px, overlap_px, threshold,
                                progress=lambda done, total: bar.update(task, completed=done, total=total),
                                device=device)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(vars(report) | {"chips_per_s": report.chips_per_s}, default=str))
    else:
        console.print(f"plan {report.plan_id}: {len(report.processed)} cells done now, {len(report.skipped_done)} "
                      f"already done, {len(report.failed)} failed, {len(report.no_imagery)} without imagery; "
                      f"{report.detections} detections in {report.detections_parquet} and {report.detections_gpkg} "
                      f"({report.chips_per_s:.1f} chips/s)", highlight=False)
    for item in report.failed:
        errors.print(f"[red]failed:[/] cell {item['cell_token']}: {item['reason']}", highlight=False)
    for item in report.tiles_skipped:
        errors.print(f"[yellow]skipped:[/] {item['file']}: {item['reason']}", highlight=False)


@app.command("flywheel")
def flywheel(
    ctx: typer.Context,
    rounds: Annotated[int, typer.Option(help="Rounds of ingest → masks → dataset → train → infer → validate → embed tiles → mine negatives → find similar → backfill.")] = 2,
    out: Annotated[Path, typer.Option(help="Run folder: flywheel_state.json (resume), flywheel_rounds.csv/json, round_<k>/.")] = Path("data/flywheel"),
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML [flywheel] table of FlywheelConfig fields.")] = None,
) -> None:
    """Run the data flywheel N rounds on the embedded defaults; re-running resumes where it stopped."""
    from aegir.pipelines.flywheel import load_flywheel_config, run_flywheel

    def report(round_index: int, step: str, result: dict, skipped: bool) -> None:
        note = "done earlier" if skipped else f"{result.get('seconds', 0):.1f} s"
        errors.print(f"round {round_index} · {step}: {note}", highlight=False)

    try:
        table = run_flywheel(_settings(ctx), out, rounds, load_flywheel_config(config), on_step=report)
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        _fail(str(exc))
    view = Table("round", "rows", "version", "masks by source", "val IoU", "test IoU", "test obj. F1", "detections",
                 "accepted", "rejected", "review", "backfilled", "hard neg.", "mined neg.", "cells boosted",
                 "boosted hit rate", "version after")

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    def hook(row: dict, switch: str, value) -> str:
        return "off" if row.get(switch) == "off" else str(value if value is not None else "-")

    for row in table:
        masks = ", ".join(f"{k} {v}" for k, v in row["masks_by_source"].items())
        view.add_row(*map(str, (row["round"], row["rows"], row["data_version"], masks, fmt(row["val_iou"]),
                                fmt(row["held_out_pixel_iou"]), fmt(row["held_out_object_f1"]), row["detections"],
                                row["accepted"], row["rejected"], row["needs_review"], row["backfilled"],
                                row["hard_negatives"], hook(row, "hard_negative_mining", row.get("mined_added")),
                                hook(row, "find_similar_tiles", row.get("cells_reprioritised")),
                                hook(row, "find_similar_tiles", fmt(row.get("boosted_cell_hit_rate"))),
                                row["version_after_backfill"])))
    Console(width=max(console.width, 210), file=console.file).print(view)  # wide: one line per round
    console.print(f"quicklooks: {out / 'round_<k>' / 'quicklooks'}", highlight=False)
    console.print(f"per-round table: {out / 'flywheel_rounds.csv'}", highlight=False)


@app.command("quicklook")
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
        report = quicklook_training_data(_settings(ctx), uri, out, filters, limit)
    except (ValueError, ducklake.StoreError) as exc:
        _fail(str(exc))
    console.print(f"wrote {len(report['written'])} quicklooks and {report['contact_sheet']}", highlight=False)


@app.command("browse")
def browse(
    ctx: typer.Context,
    uri: Annotated[Optional[str], typer.Option(help="training_data table location (default: under the LanceDB root).")] = None,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default; the page has no login).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8765,
    version: Annotated[Optional[int], typer.Option(help="Table version the page opens at (default: latest).")] = None,
) -> None:
    """Serve a local web page over training_data: a map of chip footprints and a filterable thumbnail grid."""
    from aegir.browse import make_server, serve

    try:
        server = make_server(uri, _settings(ctx).lancedb_root, host, port, version, log_requests=True)
    except (OSError, ducklake.StoreError) as exc:
        _fail(str(exc))
    serve(server, lambda url: console.print(f"aegir browse: serving {url}  (Ctrl-C stops)", highlight=False))
    console.print("stopped", highlight=False)


@app.command("dag")
def dag(out: Annotated[Path, typer.Option(help="Image to write (.png, .svg, .pdf).")] = Path("dag.png")) -> None:
    """Write a picture of the Hamilton DAG of every stage (needs graphviz)."""
    try:
        path = pipelines.write_dag_image(out)
    except RuntimeError as exc:
        _fail(str(exc))
    console.print(f"wrote {path}")


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the settings in effect."""
    print(json.dumps({k: str(v) for k, v in vars(_settings(ctx)).items()}, indent=2))


# ---- chip embeddings and vector search (issue #8) -----------------------------------------------------------

search_app = typer.Typer(help="Vector search over chip embeddings (LanceDB chip_embeddings).", no_args_is_help=True)
app.add_typer(search_app, name="search")


@dataset_app.command("embed")
def dataset_embed(
    ctx: typer.Context,
    checkpoint: Annotated[Optional[Path], typer.Option(help="A checkpoint from `aegir train` (best.ckpt).")] = None,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB training table location (default: training_data under the LanceDB root).")] = None,
    table: Annotated[str, typer.Option(help="Embeddings table (beside the training table).")] = "chip_embeddings",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Instead of --checkpoint: local pretrained encoder state dict.")] = None,
    encoder: Annotated[Optional[str], typer.Option(help="With --encoder-weights: smp encoder name (e.g. resnet18).")] = None,
    batch_size: Annotated[int, typer.Option(help="Chips per batch.")] = 32,
    refresh: Annotated[bool, typer.Option("--refresh", help="Re-embed chips that already have a vector from this model.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Embed every training chip (pooled encoder features) into the chip_embeddings table; idempotent."""
    from aegir.pipelines import vector_search

    try:
        report = vector_search.embed_training_chips(
            _settings(ctx), checkpoint, uri, table, batch_size, refresh, device,
            str(encoder_weights) if encoder_weights else None, encoder)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    console.print(f"{report.table}: model {report.model} ({report.dim}-d), {report.embedded} embedded, "
                  f"{report.skipped_existing} already present, version {report.version}; index {report.index}",
                  highlight=False)


@search_app.command("similar")
def search_similar(
    ctx: typer.Context,
    chip: Annotated[Optional[str], typer.Option(help="uuid of a training chip to search from.")] = None,
    image: Annotated[Optional[Path], typer.Option(help="An image file to search from (embedded with the model's checkpoint).")] = None,
    where: Annotated[Optional[list[str]], typer.Option(help="Pre-filter key=value (dataset, sample_id, s2_token_l10/l13/l17, uuid, acquired_from, acquired_to); repeatable.")] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="Number of neighbours.")] = 10,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB training table location (the embeddings live beside it).")] = None,
    table: Annotated[str, typer.Option(help="Embeddings table.")] = "chip_embeddings",
    model: Annotated[Optional[str], typer.Option(help="Model id of the vectors (needed when several models are stored).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="With --image: checkpoint to embed it (default: the one recorded).")] = None,
    include_self: Annotated[bool, typer.Option("--include-self", help="Keep the query chip in the results.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Exact search (bypass the ANN index).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The k chips nearest to a chip or an image (cosine distance), optionally pre-filtered."""
    from aegir.pipelines import vector_search

    try:
        result = vector_search.similar_chips(_settings(ctx), chip, str(image) if image else None, where, k, uri,
                                             table, model, str(checkpoint) if checkpoint else None, include_self,
                                             exact)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    view = Table("rank", "distance", "uuid", "sample_id", "dataset", "s2_token_l13",
                 title=f"{result['search']} search, model {result['model']}")
    for rank, hit in enumerate(result["neighbours"], 1):
        view.add_row(str(rank), f"{hit['distance']:.5f}", hit["uuid"], str(hit["sample_id"]), str(hit["dataset"]),
                     str(hit["s2_token_l13"]))
    console.print(view)


# ---- tile-window embeddings (issue #8: inference tiles, the flywheel's embedding hooks) ---------------------------


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
    from aegir.pipelines import tile_search
    from aegir.pipelines.vector_search import load_encoder

    try:
        report = tile_search.embed_region_tiles(_settings(ctx), load_encoder(checkpoint, device=device), tiles,
                                                plan_level, window_px, stride_px, batch_size)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(vars(report), default=str))
        return
    console.print(f"{report.table}: {report.windows} windows of {report.tiles} tiles in {report.cells} cells "
                  f"(region {report.region}), {report.embedded} embedded, {report.skipped_existing} already present; "
                  f"model {report.model}", highlight=False)


@search_app.command("tiles")
def search_tiles(
    ctx: typer.Context,
    image: Annotated[Path, typer.Option(help="An image file to search from.")],
    checkpoint: Annotated[Path, typer.Option(help="The checkpoint the tiles were embedded with.")],
    tiles: Annotated[Path, typer.Option(help="The region's tile folder (as given to `aegir infer embed-tiles`).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Number of windows.")] = 10,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The k region windows nearest to an image (cosine distance), with their tile, offsets and S2 cell."""
    from aegir.pipelines import tile_search

    try:
        result = tile_search.similar_tiles(_settings(ctx), checkpoint, tiles, image, k, device)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(result))
        return
    view = Table("rank", "distance", "tile", "col", "row", "cell", title=f"model {result['model']}")
    for rank, hit in enumerate(result["neighbours"], 1):
        view.add_row(str(rank), f"{hit['distance']:.5f}", Path(hit["tile_path"]).name, str(hit["window_col"]),
                     str(hit["window_row"]), hit["cell_token"])
    console.print(view)

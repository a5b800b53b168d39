"""The ``aegir`` command line: parses arguments, calls a pipeline or store function, prints. No logic here."""

from __future__ import annotations

import json
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
    if as_json:
        print(json.dumps(vars(report)))
        return
    console.print(f"{report.location}: {report.inserted} inserted, {report.updated} updated, version {report.version}",
                  highlight=False)
    for item in report.skipped:
        errors.print(f"[yellow]skipped:[/] {item.get('file') or item.get('prompt')}: {item['reason']}", highlight=False)


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

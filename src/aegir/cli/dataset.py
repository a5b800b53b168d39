"""`aegir dataset …`: build, inspect and embed the LanceDB training_data table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from aegir.cli import render
from aegir.cli.common import console, errors, fail, label_query, settings_of
from aegir.pipelines import dataset as dataset_jobs
from aegir.store import ducklake

dataset_app = typer.Typer(help="The LanceDB training_data table.", no_args_is_help=True)


@dataset_app.command("build")
def dataset_build(
    ctx: typer.Context,
    images: Annotated[Optional[Path], typer.Option(help="Folder of image tiles (BMP, PNG, JPEG, GeoTIFF).")] = None,
    masks: Annotated[Optional[Path], typer.Option(help="Folder of ground-truth masks matched by file stem (PV where > 0).")] = None,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    from_lakehouse: Annotated[bool, typer.Option("--from-lakehouse", help="Lakehouse labels × the imagery catalog → Mask Factory masks.")] = False,
    dataset: Annotated[Optional[list[str]], typer.Option(help="With --from-lakehouse: label dataset(s).")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: min_lon,min_lat,max_lon,max_lat.")] = None,
    s2_prefix: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: S2 token (level ≤ 17).")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: earliest label date.")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="With --from-lakehouse: latest label date.")] = None,
    backend: Annotated[str, typer.Option(help="With --from-lakehouse: Mask Factory backend: offline, sam, sam-hq, sam2, model.")] = "offline",
    checkpoint: Annotated[Optional[str], typer.Option(help="With --backend sam / sam-hq / model: checkpoint file.")] = None,
    chip_size: Annotated[int, typer.Option(help="With --from-lakehouse: pixels of the window centred on each label.")] = 256,
    whole_images: Annotated[bool, typer.Option("--whole-images", help="With --from-lakehouse: one row per whole image instead of chips.")] = False,
    imagery: Annotated[Optional[list[str]], typer.Option(help="With --from-lakehouse: only images of these catalog datasets.")] = None,
    images_per_label: Annotated[str, typer.Option(help="With --from-lakehouse: all (every image a label meets) or best.")] = "all",
    name: Annotated[Optional[str], typer.Option(help="Dataset name stored in the rows (default: from the folder / labels).")] = None,
    encoding: Annotated[str, typer.Option(help="Chip bytes: raw (fastest), png or tiff.")] = "raw",
    msi: Annotated[Optional[Path], typer.Option(help="Folder of Sentinel-2 band files to cut co-registered MSI chips from.")] = None,
    processing_baseline: Annotated[Optional[str], typer.Option(help="With --msi: processing baseline (NN.NN) when the product metadata has none.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Build (upsert) training_data rows from an image folder (+ ground truth) or from the lakehouse."""
    settings = settings_of(ctx)
    if from_lakehouse:
        _build_from_lakehouse(settings, label_query(dataset, bbox, s2_prefix, date_from, date_to, None), uri, backend,
                              {"checkpoint": checkpoint} if checkpoint else {}, None if whole_images else chip_size,
                              encoding, imagery or (), images_per_label, name, as_json)
        return
    if images is None:
        fail("--images DIR is required (or --from-lakehouse to build from labels and the imagery catalog)")
    from aegir.store.image_files import list_image_files
    from aegir.store.msi_files import MsiError

    try:
        total = len(list_image_files(images))
        with Progress(console=errors) as bar:
            task = bar.add_task("building training_data", total=total)
            report = dataset_jobs.build_dataset_from_images(
                settings, images, masks, uri, name, encoding, str(msi) if msi else None,
                lambda n: bar.advance(task, n), processing_baseline)
    except (ValueError, FileNotFoundError, MsiError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    render.print_build_report(report)


def _build_from_lakehouse(settings, query, uri, backend, options, chip_size, encoding, imagery, images_per_label,
                          name, as_json) -> None:
    from aegir.masks.base import MaskBackendError
    from aegir.pipelines import lakehouse_build

    try:
        with Progress(console=errors, transient=True) as bar:
            task = bar.add_task("masks from the lakehouse", total=None)
            report = lakehouse_build.build_training_from_lakehouse(
                settings, query, uri, backend, options, chip_size, encoding, imagery, images_per_label, name,
                lambda n: bar.advance(task, n))
    except (ValueError, FileNotFoundError, MaskBackendError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report), default=str))
        return
    console.print(f"{report.location}: {report.inserted} inserted, {report.updated} updated, version {report.version} "
                  f"(build {report.build_id}, DuckLake snapshot {report.ducklake_snapshot_id}); {report.prompts} "
                  f"prompts on {report.images} images", highlight=False)
    for label_set, count in sorted(report.without_imagery.items()):
        console.print(f"  {label_set}: {count} labels on no catalogued image", highlight=False)
    render.print_skipped(report.skipped)


@dataset_app.command("lineage")
def dataset_lineage(
    ctx: typer.Context,
    sample_uuid: Annotated[str, typer.Argument(help="The row's uuid.")],
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Where a row's mask came from: labels, DuckLake snapshot, image, prompts, backend, build (Lance version)."""
    from aegir.pipelines import lakehouse_build

    try:
        lineage = lakehouse_build.row_lineage(settings_of(ctx), sample_uuid, uri)
    except ducklake.StoreError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(lineage, default=str))
        return
    console.print(render.lineage_table(lineage))


@dataset_app.command("export-masks")
def dataset_export_masks(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for <image stem>.png (0/255, the image's size) and .tif.")],
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Only rows of this dataset (metadata.dataset).")] = None,
    mask: Annotated[str, typer.Option(help="Which mask: generated, truth or auto (truth where present).")] = "generated",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Burn the rows' masks back onto each source image's grid, for people and QGIS."""
    from aegir.pipelines import lakehouse_build

    try:
        report = lakehouse_build.export_masks(settings_of(ctx), out, uri, dataset, mask)
    except (ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(report))
        return
    console.print(f"wrote {len(report['written'])} masks from {report['rows']} rows to {report['out_dir']}",
                  highlight=False)
    render.print_skipped(report["skipped"])


@dataset_app.command("info")
def dataset_info(
    ctx: typer.Context,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows, versions, size, S2 coverage and class balance of a training_data table."""
    try:
        info = dataset_jobs.dataset_info(settings_of(ctx), uri)
    except ducklake.StoreError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(info))
        return
    console.print(render.field_table(info))


@dataset_app.command("optimize")
def dataset_optimize(
    ctx: typer.Context,
    uri: Annotated[Optional[str], typer.Option(help="LanceDB table location (default: training_data under the LanceDB root).")] = None,
    older_than_days: Annotated[float, typer.Option(help="Remove untagged versions older than this many days (0: all but the latest).")] = 7.0,
    keep: Annotated[Optional[list[int]], typer.Option(help="A version to keep whatever its age (tagged keep-v<N>); repeatable.")] = None,
    keep_from: Annotated[Optional[list[Path]], typer.Option(help="A folder of checkpoints (e.g. a flywheel run): every version they were trained on is kept; repeatable.")] = None,
    remove_orphans: Annotated[bool, typer.Option("--remove-orphans", help="Also delete files no version references (a killed Ray build's fragments), whatever their age: only while nothing else writes to the table.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compact fragments, bring the BTREE indexes up to date, remove old versions (tagged ones stay)."""
    try:
        report = dataset_jobs.optimize_dataset(settings_of(ctx), uri, older_than_days, keep, keep_from,
                                               remove_orphans)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    console.print(f"{report.location}: {report.rows:,} rows; fragments {report.fragments_before} → "
                  f"{report.fragments_after}; versions {report.versions_before} → {report.versions_after} "
                  f"(latest {report.latest_version}; {report.versions_removed} removed, "
                  f"{report.bytes_removed / 1e6:.1f} MB freed); kept by tag: "
                  f"{', '.join(map(str, report.kept_versions)) or 'none'}; indexes built: "
                  f"{', '.join(report.indexes_built) or 'none'}", highlight=False)


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
        report = ray_scale.build_dataset_ray(settings_of(ctx), images, masks, uri, name, encoding,
                                             str(msi) if msi else None, num_blocks, address)
    except (ValueError, FileNotFoundError, RuntimeError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    render.print_build_report(report)


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
    from aegir.pipelines import embeddings

    try:
        report = embeddings.embed_training_chips(
            settings_of(ctx), checkpoint, uri, table, batch_size, refresh, device,
            str(encoder_weights) if encoder_weights else None, encoder)
    except (ValueError, FileNotFoundError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    console.print(f"{report.table}: model {report.model} ({report.dim}-d), {report.embedded} embedded, "
                  f"{report.skipped_existing} already present, version {report.version}; index {report.index}",
                  highlight=False)

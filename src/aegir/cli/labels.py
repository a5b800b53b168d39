"""`aegir labels …`, `aegir prompts export` and `aegir lake maintain`: label sets in the DuckLake lakehouse, their
prompts, and the lakehouse's upkeep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import Progress

from aegir.cli import render
from aegir.cli.common import console, fail, label_query, settings_of
from aegir.pipelines import labels as label_jobs
from aegir.sample_data import SAMPLE_LABEL_SETS
from aegir.store import ducklake
from aegir.store.label_files import LabelFileError

labels_app = typer.Typer(help="PV label sets in the DuckLake lakehouse.", no_args_is_help=True)
prompts_app = typer.Typer(help="Mask Factory prompts from lakehouse labels.", no_args_is_help=True)
lake_app = typer.Typer(help="The DuckLake lakehouse itself: upkeep.", no_args_is_help=True)


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
            report = label_jobs.import_labels(settings_of(ctx), path, dataset, crs, lon_col, lat_col, doi)
    except (LabelFileError, ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    render.print_import_report(report)


@labels_app.command("import-samples")
def labels_import_samples(ctx: typer.Context) -> None:
    """Import every shared label set under <sample_data_dir>/labels (India, OSM DE/AT, USPVDB, ORNL)."""
    settings = settings_of(ctx)
    reports = []
    with Progress(console=console) as progress:
        task = progress.add_task("importing shared label sets", total=len(SAMPLE_LABEL_SETS))
        for item in SAMPLE_LABEL_SETS:
            try:
                reports.append(
                    label_jobs.import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)
                )
            except (LabelFileError, ValueError, ducklake.StoreError) as exc:
                fail(str(exc))
            progress.advance(task)
    for report in reports:
        render.print_import_report(report)


@labels_app.command("list")
def labels_list(
    ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False
) -> None:
    """Datasets in the lakehouse with row counts and the DuckLake snapshot id."""
    try:
        summaries = label_jobs.list_datasets(settings_of(ctx))
    except ducklake.StoreError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(summaries))
        return
    console.print(render.datasets_table(summaries))


@labels_app.command("quarantine")
def labels_quarantine(
    ctx: typer.Context,
    dataset: Annotated[Optional[str], typer.Option(help="Only this dataset.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Rows that could not be imported, with file, row number and reason."""
    settings = settings_of(ctx)
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


@labels_app.command("from-masks")
def labels_from_masks(
    images: Annotated[Path, typer.Option(help="Folder of image tiles (georeferenced or named, e.g. Jiang PV01).")],
    masks: Annotated[Path, typer.Option(help="Folder of masks with the tiles' file stems (PV where > 0).")],
    out: Annotated[Path, typer.Option(help="Folder for <name>_polygons|boxes|points.geojson (EPSG:4326).")],
    name: Annotated[Optional[str], typer.Option(help="Label set name (default: the images folder's, or its "
                                                     "parent's when it is called images).")] = None,
) -> None:
    """Ground-truth masks → panel polygons, one box per array and one point per array (array = 8-connected
    component), as GeoJSON files ready for `aegir labels import`."""
    from aegir.pipelines.dataset import default_dataset_name

    try:
        with console.status(f"vectorising masks in {masks} …"):
            report = label_jobs.labels_from_masks(images, masks, out, name or default_dataset_name(images))
    except (ValueError, OSError) as exc:
        fail(str(exc))
    console.print(f"{report.name}: {report.tiles} tiles with masks, {len(report.skipped)} skipped", highlight=False)
    for kind, path in report.paths.items():
        console.print(f"  {kind:<8} {report.counts[kind]:>6} rows  {path}", highlight=False)
    for item in report.skipped:
        console.print(f"  skipped {item['file']}: {item['reason']}", highlight=False)


@prompts_app.command("export")
def prompts_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="GeoParquet file to write (EPSG:4326).")],
    dataset: Annotated[Optional[list[str]], typer.Option(help="Dataset(s); all when omitted.")] = None,
    bbox: Annotated[Optional[str], typer.Option(help="min_lon,min_lat,max_lon,max_lat (EPSG:4326).")] = None,
    s2_prefix: Annotated[Optional[str], typer.Option(help="S2 cell token, level ≤ 17 (labels inside that cell).")] = None,
    date_from: Annotated[Optional[str], typer.Option(help="Earliest label date (YYYY-MM-DD).")] = None,
    date_to: Annotated[Optional[str], typer.Option(help="Latest label date (YYYY-MM-DD).")] = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many prompts.")] = None,
    with_imagery: Annotated[bool, typer.Option("--with-imagery", help="One prompt per (label, catalogued image) "
                                                                     "pair, in the image's pixel grid.")] = False,
    images_per_label: Annotated[str, typer.Option(help="With --with-imagery: all (every image a label meets) or "
                                                       "best (the one holding most of it).")] = "all",
) -> None:
    """Write Mask Factory prompts (one per label) for the labels matching the filters."""
    from aegir.store.prompt_files import write_image_prompts, write_prompts_geoparquet

    query = label_query(dataset, bbox, s2_prefix, date_from, date_to, limit)
    if with_imagery:
        from aegir.pipelines.imagery import join_labels_to_imagery

        try:
            joined = join_labels_to_imagery(settings_of(ctx), query, image_assignment=images_per_label)
        except (ValueError, ducklake.StoreError) as exc:
            fail(str(exc))
        write_image_prompts(joined.prompts, joined.labels, out)
        images = len(set(joined.prompts["image_id"].to_pylist()))
        clipped = sum(joined.prompts["clipped"].to_pylist())
        console.print(f"wrote {joined.prompts.num_rows} prompts on {images} images ({clipped} clipped) to {out}; "
                      f"join {joined.stats['join_seconds']} s", highlight=False)
        for name, count in sorted(joined.without_imagery.items()):
            console.print(f"  {name}: {count} labels on no catalogued image", highlight=False)
        return
    try:
        prompts = label_jobs.build_prompts(settings_of(ctx), query)
    except (ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    write_prompts_geoparquet(prompts, out)
    console.print(f"wrote {prompts.num_rows} prompts to {out}")


@lake_app.command("maintain")
def lake_maintain(
    ctx: typer.Context,
    older_than_days: Annotated[float, typer.Option(help="Expire snapshots and delete freed / orphaned files older than this many days (0: all but the current snapshot).")] = 7.0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be expired and deleted; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Compact small files, expire old snapshots, delete the files that frees and orphaned files."""
    try:
        report = label_jobs.maintain_lake(settings_of(ctx), older_than_days, dry_run)
    except (ValueError, ducklake.StoreError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(vars(report)))
        return
    verb = "would expire" if dry_run else "expired"
    console.print(f"lakehouse: snapshots {report.snapshots_before} → {report.snapshots_after} ({verb} "
                  f"{len(report.expired_snapshots)}); {len(report.deleted_files)} freed files and "
                  f"{len(report.orphaned_files)} orphaned files {'to delete' if dry_run else 'deleted'}",
                  highlight=False)


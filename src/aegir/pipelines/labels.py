"""Label jobs (``aegir labels import|list|from-masks``, ``aegir prompts export``, ``aegir lake maintain``): label
files → DuckLake, DuckLake → prompts, pixel ground-truth masks → label files (panel polygons, array boxes, array
points), lakehouse upkeep."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from aegir.config import Settings
from aegir.pipelines import run_stage
from aegir.store import ducklake
from aegir.store.label_files import read_label_file



@dataclass(frozen=True)
class ImportReport:
    """Outcome of one ``aegir labels import``: counts, the quarantined reasons and the new snapshot."""

    dataset: str
    source_file: str
    rows_read: int
    commit: ducklake.ImportCommit
    problems: dict[int, str]


def import_labels(
    settings: Settings,
    path: str | Path,
    dataset: str,
    crs: str | None = None,
    lon_col: str | None = None,
    lat_col: str | None = None,
    doi: str | None = None,
) -> ImportReport:
    """Read a label file, normalise it (EPSG:4326, valid, geodesic area, S2/H3) and write it in one transaction."""
    ducklake.label_table_name(dataset)  # validate the name before any work
    source = read_label_file(path, crs=crs, lon_col=lon_col, lat_col=lat_col)
    result = run_stage(
        "label_import",
        ["label_rows", "quarantine_rows", "geometry_problems"],
        {
            "label_source": source,
            "dataset_name": dataset,
            "s2_levels": ducklake.LABEL_S2_LEVELS,  # the label tables' fixed cell columns
            "h3_resolution": ducklake.LABEL_H3_RESOLUTION,
            "imported_at": dt.datetime.now(dt.timezone.utc),
            "doi": doi,
        },
    )
    con = ducklake.connect(settings)
    try:
        commit = ducklake.write_label_batch(con, settings, dataset, result["label_rows"], result["quarantine_rows"])
    finally:
        con.close()
    return ImportReport(dataset, str(source.path), len(source.frame), commit, result["geometry_problems"])


def list_datasets(settings: Settings) -> list[dict]:
    """Label datasets in the lakehouse with row counts and the current snapshot id."""
    con = ducklake.connect(settings)
    try:
        return ducklake.dataset_summaries(con, settings)
    finally:
        con.close()


def maintain_lake(settings: Settings, older_than_days: float, dry_run: bool = False) -> ducklake.LakeUpkeep:
    """``aegir lake maintain``: compact, expire snapshots older than ``older_than_days`` and delete the files that
    frees plus orphaned files (:func:`aegir.store.ducklake.maintain_lakehouse`)."""
    if older_than_days < 0:
        raise ValueError(f"--older-than-days must be >= 0, got {older_than_days}")
    con = ducklake.connect(settings)
    try:
        return ducklake.maintain_lakehouse(con, settings, dt.timedelta(days=older_than_days), dry_run)
    finally:
        con.close()


def read_labels(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Label rows matching ``query`` (columns ``ducklake.LABEL_COLUMNS``), read from the lakehouse."""
    con = ducklake.connect(settings)
    try:
        return ducklake.query_labels(con, settings, query)
    finally:
        con.close()


def build_prompts(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Prompts (uuid, dataset, WKB geometry EPSG:4326, bbox, centroid, S2, H3) for the labels matching ``query``."""
    return run_stage("prompts", ["prompts"], {"label_records": read_labels(settings, query)})["prompts"]


MASK_LABEL_KINDS = {"polygons": "panel_polygons", "boxes": "array_boxes", "points": "array_points"}
MASK_LABELS_BATCH = 256  # tiles per DAG run: bounds the pixels held at once


@dataclass(frozen=True)
class MaskLabelsReport:
    """Outcome of ``aegir labels from-masks``: kind ("polygons", "boxes", "points") → file written and its row
    count (one row per 8-connected mask component), tiles used, and every skipped file with its reason."""

    name: str
    paths: dict[str, str]
    counts: dict[str, int]
    tiles: int
    skipped: list[dict]


def _truth_tile(path: Path, mask_path: Path, skipped: list[dict]):
    """(chip with ``sample_id``, mask) of one tile, or None with the reason appended to ``skipped``."""
    import dataclasses

    from aegir.store.image_files import read_mask
    from aegir.store.rasters import named_tile_chip
    from aegir.utils import geo

    try:
        chip = named_tile_chip(str(path))
    except (ValueError, OSError) as exc:
        skipped.append({"file": str(path), "reason": str(exc)})
        return None
    if chip.crs == geo.PIXEL_GRID_CRS:
        skipped.append({"file": str(path), "reason": "bare pixel grid: no georeference and no file-name convention"})
        return None
    try:
        mask = read_mask(mask_path)
    except ValueError as exc:
        skipped.append({"file": str(mask_path), "reason": str(exc)})
        return None
    if mask.shape != (chip.height, chip.width):
        skipped.append({"file": str(mask_path),
                        "reason": f"mask is {mask.shape}, image {path.name} is {(chip.height, chip.width)}"})
        return None
    return dataclasses.replace(chip, extras={**chip.extras, "sample_id": path.stem}), mask


def labels_from_masks(images_dir: str | Path, masks_dir: str | Path, out_dir: str | Path,
                      name: str) -> MaskLabelsReport:
    """Ground-truth masks (matched to tiles by file stem) → three label files in ``out_dir``:
    ``<name>_polygons.geojson`` (panel polygons), ``<name>_boxes.geojson`` (one box per array) and
    ``<name>_points.geojson`` (one point per array), EPSG:4326, through the tiles' grids (file or file-name
    convention). Tiles without a mask, unreadable tiles or masks, and tiles on a bare pixel grid are skipped."""
    import geopandas as gpd
    import pandas as pd

    from aegir.store.image_files import list_image_files, mask_files_by_stem
    from aegir.store.mask_files import write_polygons

    ducklake.label_table_name(name)  # the name must also make valid dataset names (<name>_polygons, …)
    images = list_image_files(images_dir)
    masks_by_stem = mask_files_by_stem(masks_dir)
    skipped: list[dict] = []
    stems = {path.stem for path in images}
    skipped += [{"file": str(p), "reason": "mask without an image tile"}
                for stem, p in sorted(masks_by_stem.items()) if stem not in stems]
    frames: dict[str, list] = {kind: [] for kind in MASK_LABEL_KINDS}
    tiles = 0
    for start in range(0, len(images), MASK_LABELS_BATCH):
        chips, masks = [], {}
        for path in images[start : start + MASK_LABELS_BATCH]:
            if path.stem not in masks_by_stem:
                skipped.append({"file": str(path), "reason": "no mask with the same file stem"})
                continue
            loaded = _truth_tile(path, masks_by_stem[path.stem], skipped)
            if loaded is not None:
                chips.append(loaded[0])
                masks[path.stem] = loaded[1]
        tiles += len(chips)
        result = run_stage("mask_labels", list(MASK_LABEL_KINDS.values()),
                           {"truth_chips": chips, "truth_masks": masks, "truth_source": f"{name} mask"})
        for kind, node in MASK_LABEL_KINDS.items():
            frames[kind].append(result[node])
    paths, counts = {}, {}
    for kind, parts in frames.items():
        frame = gpd.GeoDataFrame(pd.concat(parts, ignore_index=True), crs="EPSG:4326")
        paths[kind] = str(write_polygons(frame, Path(out_dir) / f"{name}_{kind}.geojson"))
        counts[kind] = len(frame)
    return MaskLabelsReport(name, paths, counts, tiles, skipped)

"""Hamilton driver wrapper: which dataflow modules make which outputs, and the jobs the CLI calls.

Each job reads through the store layer, runs a Hamilton DAG of pure functions, and writes through the store
layer. Dataflows never open connections: they receive data (or a connection) as an input node.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
from hamilton import base, driver

from aegir.config import Settings
from aegir.dataflows import (
    backfill,
    chip_embeddings,
    embedding_hooks,
    grid_plan,
    ingest_ducklake_labels,
    label_import,
    lance_writer,
    region_inference,
    s2_indexing,
    sam_mask_factory,
    tile_embeddings,
    training_sample_builder,
    validation,
)
from aegir.store import ducklake
from aegir.store.label_files import read_label_file
from aegir.utils import geo

H3_RESOLUTION = 12

STAGES: dict[str, tuple[ModuleType, ...]] = {
    "label_import": (label_import, s2_indexing),
    "prompts": (ingest_ducklake_labels,),
    "training_samples": (training_sample_builder, lance_writer),
    "mask_factory": (sam_mask_factory,),
    "grid_plan": (grid_plan,),
    "region_inference": (region_inference,),
    "validation": (validation,),
    "backfill": (backfill,),
    "chip_embeddings": (chip_embeddings,),
    "tile_embeddings": (tile_embeddings,),
    "embedding_hooks": (embedding_hooks,),
}


def build_driver(modules: Sequence[ModuleType], config: dict[str, Any] | None = None) -> driver.Driver:
    """A Hamilton driver over ``modules`` whose ``execute`` returns a dict of the requested outputs."""
    return (
        driver.Builder()
        .with_modules(*modules)
        .with_config(config or {})
        .with_adapters(base.DictResult())
        .build()
    )


def run_stage(stage: str, outputs: Iterable[str], inputs: dict[str, Any]) -> dict[str, Any]:
    """Execute ``outputs`` of one named stage with ``inputs``; returns {output name: value}."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return build_driver(STAGES[stage]).execute(list(outputs), inputs=inputs)


def write_dag_image(path: str | Path, stages: Sequence[str] | None = None) -> Path:
    """Write the DAG of ``stages`` (all by default): ``.dot`` as Graphviz source, other suffixes rendered by ``dot``.

    Needs the ``graphviz`` Python package (extra ``dag``); rendering also needs the Graphviz ``dot`` binary.
    """
    try:
        import graphviz
    except ImportError as exc:
        raise RuntimeError("`aegir dag` needs graphviz: pip install 'aegir-lightning-lance[dag]'") from exc
    modules = sorted({m for name in (stages or STAGES) for m in STAGES[name]}, key=lambda m: m.__name__)
    digraph = build_driver(modules).display_all_functions()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".dot":
        path.write_text(digraph.source)
        return path
    try:
        rendered = digraph.render(outfile=path, cleanup=True)
    except graphviz.ExecutableNotFound as exc:
        raise RuntimeError(
            f"cannot render {path}: the Graphviz `dot` program is not installed (apt-get install graphviz); "
            "write a .dot file instead"
        ) from exc
    return Path(rendered)


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
            "s2_levels": settings.s2_levels,
            "h3_resolution": H3_RESOLUTION,
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


def build_prompts(settings: Settings, query: ducklake.LabelQuery) -> pa.Table:
    """Prompts (uuid, dataset, WKB geometry EPSG:4326, bbox, centroid, S2, H3) for the labels matching ``query``."""
    con = ducklake.connect(settings)
    try:
        return run_stage(
            "prompts",
            ["prompts"],
            {"ducklake_connection": con, "settings": settings, "label_query": query},
        )["prompts"]
    finally:
        con.close()


# ---- training_data builds ----------------------------------------------------------------------------------

# Chips per Lance commit: bounds memory (merge_insert hashes the incoming batch inside Lance's 300 MB pool;
# 256 RGB 256² chips + masks ≈ 70 MB); each commit is a complete, readable version.
BUILD_BATCH = 256


@dataclass(frozen=True)
class BuildReport:
    """Outcome of ``aegir dataset build``: rows upserted, the table version after the build (indexes included),
    and every skipped input with its reason."""

    location: str
    inserted: int
    updated: int
    version: int
    skipped: list[dict]


def _write_training_batch(table, chips, masks, msi, dataset, encoding, mask_source, params) -> "lance_io.UpsertResult":
    return run_stage(
        "training_samples",
        ["training_upsert", "training_indexes"],
        {
            "sample_chips": chips,
            "sample_masks": masks,
            "msi_chips": msi,
            "dataset_name": dataset,
            "chip_encoding": encoding,
            "mask_source": mask_source,
            "provenance_params": params,
            "training_table": table,
        },
    )["training_upsert"]


def _msi_for(chips, msi_dir: str | None) -> tuple[dict, list[dict]]:
    """Co-registered Sentinel-2 chips (sample_id → Chip) for chips inside the scene in ``msi_dir``."""
    if not msi_dir:
        return {}, []
    from aegir.dataflows import msi

    files = msi.msi_band_files(msi_dir)
    grid = msi.msi_scene_grid(files)
    offset = msi.msi_dn_offset()
    out, skipped = {}, []
    for chip in chips:
        try:
            out[chip.extras["sample_id"]] = msi.msi_chip_for_bounds(files, grid, chip.bounds, chip.crs.to_string(), offset)
        except msi.MsiError as exc:
            skipped.append({"file": chip.source, "reason": f"no MSI chip: {exc}"})
    return out, skipped


def _tile_chip(path: Path, skipped: list[dict]):
    """A loaded tile Chip, or None with the reason appended to ``skipped`` (corrupt, no georeference, all nodata)."""
    from aegir.dataflows.vhr_loaders import named_tile_chip

    try:
        chip = named_tile_chip(str(path))
    except (ValueError, OSError) as exc:
        skipped.append({"file": str(path), "reason": str(exc)})
        return None
    if chip.valid is not None and not chip.valid.any():
        skipped.append({"file": str(path), "reason": "every pixel is nodata"})
        return None
    return chip


def _default_dataset_name(images_dir: str | Path) -> str:
    """The images folder's name, or its parent's when it is called ``images`` (``jiang_pv01/images`` → jiang_pv01)."""
    folder = Path(images_dir).resolve()
    return folder.parent.name if folder.name == "images" else folder.name


def load_tile_chips(paths: list[Path], masks_by_stem: dict[str, str], skipped: list[dict]) -> tuple[list, dict]:
    """(chips with ``sample_id``/``prompt_wkb`` extras, {stem: (H, W) uint8 mask}) of image tiles; unusable
    tiles and masks are appended to ``skipped`` — the per-tile steps of ``build_dataset_from_images``."""
    import dataclasses

    from aegir.store import image_files

    chips, masks = [], {}
    for path in paths:
        chip = _tile_chip(path, skipped)
        if chip is None:
            continue
        if path.stem in masks_by_stem:
            mask_path = masks_by_stem[path.stem]
            try:
                mask = image_files.read_mask(Path(mask_path))
            except ValueError as exc:
                skipped.append({"file": mask_path, "reason": str(exc)})
                continue
            if mask.shape != (chip.height, chip.width):
                skipped.append({"file": mask_path,
                                "reason": f"mask is {mask.shape}, image {path.name} is {(chip.height, chip.width)}"})
                continue
            masks[path.stem] = mask
        extras = {**chip.extras, "sample_id": path.stem, "prompt_wkb": geo.chip_footprint_wkb(chip)}
        chips.append(dataclasses.replace(chip, extras=extras))
    return chips, masks


def build_dataset_from_images(
    settings: Settings,
    images_dir: str | Path,
    masks_dir: str | Path | None = None,
    uri: str | None = None,
    dataset: str | None = None,
    encoding: str = "raw",
    msi_dir: str | None = None,
    progress: Any = None,
) -> BuildReport:
    """One ``training_data`` row per image tile; masks matched by file stem (PV where > 0); prompt = tile footprint.

    Tiles that cannot be used (unreadable, no georeference, all nodata, mask of another size) are skipped with the
    reason; the rest of the build continues. Rows are keyed by uuid5(dataset:stem), so a rebuild upserts.
    """
    from aegir.store import image_files, lance_io

    images = image_files.list_image_files(images_dir)
    masks_by_stem = image_files.mask_files_by_stem(masks_dir)
    dataset = dataset or _default_dataset_name(images_dir)
    table = lance_io.open_training_table(uri, settings.lancedb_root)
    params = {"images_dir": str(Path(images_dir).resolve()), "masks_dir": str(masks_dir) if masks_dir else None}
    skipped: list[dict] = []
    totals = [0, 0]
    for start in range(0, len(images), BUILD_BATCH):
        batch = images[start : start + BUILD_BATCH]
        chips, masks = load_tile_chips(batch, masks_by_stem, skipped)
        if progress:
            progress(len(batch))
        msi_chips, msi_skipped = _msi_for(chips, msi_dir)
        skipped += msi_skipped
        result = _write_training_batch(table, chips, masks, msi_chips, dataset, encoding, "ground_truth", params)
        totals = [totals[0] + result.inserted, totals[1] + result.updated]
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    return BuildReport(f"{root}/{name}", totals[0], totals[1], table.version, skipped)


def dataset_info(settings: Settings, uri: str | None = None) -> dict:
    """Rows, versions, size, S2 coverage and class balance of a ``training_data`` table."""
    from aegir.store import lance_io

    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return lance_io.table_summary(table) | lance_io.class_balance(table)


def build_dataset_from_lakehouse(
    settings: Settings,
    query: ducklake.LabelQuery,
    images_dir: str | Path,
    uri: str | None = None,
    dataset: str | None = None,
    chip_size: int = 256,
    encoding: str = "raw",
    msi_dir: str | None = None,
    progress: Any = None,
) -> BuildReport:
    """One row per lakehouse prompt that falls on a tile in ``images_dir``: a chip centred on the prompt, the
    ground-truth mask burnt from every polygon label of the query touching the chip (points: no mask yet, the Mask
    Factory makes it). Prompts on no tile are reported as skipped. Rows are keyed by the prompt uuid.
    """
    import dataclasses

    import shapely

    from aegir.store import image_files, lance_io

    prompts = build_prompts(settings, query)
    geometries = shapely.from_wkb(prompts["prompt_geometry"].to_numpy(zero_copy_only=False))
    wkbs = prompts["prompt_geometry"].to_pylist()
    tree = shapely.STRtree(geometries)
    table = lance_io.open_training_table(uri, settings.lancedb_root)
    skipped: list[dict] = []
    chips, masks, used = [], {}, set()
    for path in image_files.list_image_files(images_dir):
        tile = _tile_chip(path, skipped)
        if progress:
            progress(1)
        if tile is None:
            continue
        footprint = shapely.from_wkb(geo.chip_footprint_wkb(tile))
        for index in tree.query(footprint, predicate="intersects"):
            if index in used or not footprint.contains(shapely.centroid(geometries[index])):
                continue
            used.add(int(index))
            sample_id = prompts["uuid"][int(index)].as_py()
            chip = geo.chip_centred_on(tile, shapely.centroid(geometries[index]), chip_size)
            chip = dataclasses.replace(chip, extras={**chip.extras, "sample_id": sample_id, "uuid": sample_id,
                                                     "prompt_wkb": wkbs[index], "tile": tile.source})
            chip_area = shapely.from_wkb(geo.chip_footprint_wkb(chip))
            touching = [wkbs[i] for i in tree.query(chip_area, predicate="intersects")]
            mask = geo.burn_polygons(chip, touching)
            if mask is not None:
                masks[chip.extras["sample_id"]] = mask
            chips.append(chip)
    skipped += [{"prompt": prompts["uuid"][i].as_py(), "reason": "no tile in the images folder covers its centroid"}
                for i in range(prompts.num_rows) if i not in used]
    datasets = sorted(set(prompts["dataset"].to_pylist())) or ["lakehouse"]
    dataset = dataset or "+".join(datasets)
    params = {"images_dir": str(Path(images_dir).resolve()), "query": repr(query), "chip_size": chip_size}
    msi_chips, msi_skipped = _msi_for(chips, msi_dir)
    result = _write_training_batch(table, chips, masks, msi_chips, dataset, encoding,
                                   "lakehouse_labels", params)
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    return BuildReport(f"{root}/{name}", result.inserted, result.updated, table.version, skipped + msi_skipped)


# ---- Mask Factory ------------------------------------------------------------------------------------------

MASK_OUTPUTS = ("union_mask", "mask_polygons", "skipped_prompts", "mask_result")


@dataclass
class MaskReport:
    """Outcome of ``aegir masks generate``: masks written (stem → path), prompts used, skips with reasons."""

    out_dir: str
    backend: str
    backend_version: str
    written: dict[str, str]
    prompts_used: int
    skipped: list[dict]
    polygons_path: str | None = None
    lance: dict | None = None


def _prompt_file_names(prompts) -> "pd.Series":
    """The prompt rows' ``filename`` as str, None where absent/blank (pandas 3 keeps None as NA under astype)."""
    import pandas as pd

    if "filename" not in prompts.columns:
        return pd.Series([None] * len(prompts), index=prompts.index, dtype=object)
    return prompts["filename"].map(lambda v: v.strip() if isinstance(v, str) and v.strip() not in ("", "None", "nan")
                                   else None)


def _prompts_for_image(prompts, image_path: Path, footprint_wkb: bytes | None):
    """The prompt rows of one image: pixel rows by file name (name or stem), georeferenced rows pinned to the file
    or, without a file name, touching the image footprint."""
    import shapely

    names = _prompt_file_names(prompts)
    pinned = names.map(lambda n: n is not None and (n == image_path.name or Path(n).stem == image_path.stem))
    if "geometry" not in prompts.columns:
        return prompts[pinned.astype(bool)]
    touching = np.zeros(len(prompts), bool)
    if footprint_wkb is not None:
        touching = shapely.intersects(shapely.from_wkb(footprint_wkb), prompts["geometry"].to_numpy())
    return prompts[pinned.astype(bool).to_numpy() | (names.isna().to_numpy() & touching)]


def generate_masks(
    images_dir: str | Path,
    prompts_file: str | Path,
    backend: str = "offline",
    out_dir: str | Path = "masks",
    backend_options: dict | None = None,
    polygons_path: str | Path | None = None,
    settings: Settings | None = None,
    lance_uri: str | None = None,
    dataset: str | None = None,
    progress: Any = None,
    mask_backend: Any = None,
) -> MaskReport:
    """Masks for every image in ``images_dir`` from the prompts in ``prompts_file`` (see ``aegir masks generate``).

    Writes ``OUT/<stem>.png`` (uint8 0/255, union of the image's prompts; all zero for an image without prompts),
    ``OUT/geotiff/<stem>.tif`` for images with a file georeference, the scored polygons (``polygons_path``, default
    ``OUT/mask_polygons.geojson``) and ``OUT/report.json``. Unreadable images, prompts naming no image and unusable
    prompts are recorded in ``skipped``; the other images are still processed. With ``lance_uri`` (or
    ``settings``) the masks are upserted into ``training_data.generated_mask`` (see :func:`upsert_generated_masks`).
    """
    import json

    from aegir.masks.base import get_backend
    from aegir.store import image_files, mask_files

    out = Path(out_dir)
    images = image_files.list_image_files(images_dir)
    prompts = mask_files.read_prompt_file(prompts_file)
    model = mask_backend or get_backend(backend, **(backend_options or {}))
    dag = build_driver(STAGES["mask_factory"])
    skipped: list[dict] = []
    named = _prompt_file_names(prompts).dropna()
    if len(named):
        known = {p.name for p in images} | {p.stem for p in images}
        for name in sorted(set(named)):
            if name not in known and Path(name).stem not in known:
                skipped.append({"file": name, "reason": f"prompt file names an image that is not in {images_dir}"})
    written, frames, used, lance_items = {}, [], 0, []
    for path in images:
        if progress:
            progress(1)
        try:
            chip = mask_files.read_image_chip(path)
        except mask_files.MaskFileError as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        footprint = None if chip.crs == _pixel_grid_crs() else geo.chip_footprint_wkb(chip)
        rows = _prompts_for_image(prompts, path, footprint)
        if rows.empty:
            mask = np.zeros((chip.height, chip.width), np.uint8)
            skipped.append({"file": str(path), "reason": "no prompts for this image: wrote an empty mask"})
            result_skips, polygons = [], None
        else:
            result = dag.execute(list(MASK_OUTPUTS), inputs={"image_chip": chip, "image_prompt_rows": rows,
                                                             "mask_backend": model})
            mask, polygons, result_skips = result["union_mask"], result["mask_polygons"], result["skipped_prompts"]
            used += len(rows) - len(result_skips)
        skipped += [{"file": str(path), **item} for item in result_skips]
        written[path.stem] = str(mask_files.write_mask_png(mask, out / f"{path.stem}.png"))
        if chip.georeferenced and chip.extras.get("grid_convention") == "file":
            mask_files.write_mask_geotiff(mask, chip, out / "geotiff" / f"{path.stem}.tif")
        if polygons is not None and len(polygons):
            frames.append(polygons)
        if rows is not None and not rows.empty and chip.crs != _pixel_grid_crs():
            lance_items.append((chip, path.stem, mask, polygons))
    polygons_out = _write_all_polygons(frames, Path(polygons_path) if polygons_path else out /
                                       "mask_polygons.geojson")
    report = MaskReport(str(out), model.name, model.version, written, used, skipped, str(polygons_out))
    if lance_uri is not None or settings is not None:
        report.lance = upsert_generated_masks(settings or Settings(), lance_items, model, lance_uri,
                                              dataset or _default_dataset_name(images_dir))
    (out / "report.json").write_text(json.dumps(vars(report), indent=1, default=str))
    return report


def _pixel_grid_crs():
    from aegir.utils.geo import PIXEL_GRID_CRS

    return PIXEL_GRID_CRS


def _write_all_polygons(frames: list, path: Path) -> Path:
    """Georeferenced mask polygons → ``path`` (EPSG:4326, always written); polygons of images without a
    georeference → ``<path stem>_pixels.geojson`` beside it, in pixel coordinates (x = column, y = row)."""
    import geopandas as gpd
    import pandas as pd

    from aegir.store import mask_files

    georef = [f for f in frames if f.crs is not None]
    if georef:
        frame = gpd.GeoDataFrame(pd.concat(georef, ignore_index=True), crs="EPSG:4326")
    else:
        frame = gpd.GeoDataFrame({"image": [], "prompt_id": []}, geometry=[], crs="EPSG:4326")
    pixel_frames = [f for f in frames if f.crs is None]
    if pixel_frames:
        pixels = gpd.GeoDataFrame(pd.concat(pixel_frames, ignore_index=True))
        mask_files.write_polygons(pixels, path.with_name(f"{path.stem}_pixels.geojson"))
    return mask_files.write_polygons(frame, path)


def upsert_generated_masks(settings: Settings, items: list, mask_backend: Any, uri: str | None,
                           dataset: str) -> dict:
    """Upsert one ``training_data`` row per (georeferenced) image with its generated union mask.

    The row uuid is uuid5(``dataset:<stem>``), the same key ``aegir dataset build --images`` uses, so a mask for a
    tile already in the table replaces that row's mask. Provenance: backend name, version and parameters.
    """
    import dataclasses

    import shapely

    from aegir.store import lance_io

    if not items:
        return {"inserted": 0, "updated": 0, "rows": 0}
    table = lance_io.open_training_table(uri, settings.lancedb_root)
    chips, masks = [], {}
    for chip, stem, mask, polygons in items:
        footprint = shapely.from_wkb(geo.chip_footprint_wkb(chip))
        prompt = shapely.union_all(polygons.geometry.values) if polygons is not None and len(polygons) \
            and polygons.crs is not None else footprint
        chips.append(dataclasses.replace(chip, extras={**chip.extras, "sample_id": stem,
                                                       "prompt_wkb": shapely.to_wkb(prompt)}))
        masks[stem] = mask
    params = {"backend_params": mask_backend.params, "backend_version": mask_backend.version}
    result = _write_training_batch(table, chips, masks, {}, dataset, "raw", f"mask_factory:{mask_backend.name}",
                                   params)
    return {"inserted": result.inserted, "updated": result.updated, "version": result.version, "rows": len(chips)}


def evaluate_masks(pred_dir: str | Path, truth_dir: str | Path) -> dict:
    """IoU / F1 of predicted masks against truth masks matched by file stem (PV where value > 0).

    Metrics as defined in :mod:`aegir.utils.mask_metrics`. Stems only on one side are listed in
    ``unmatched_pred`` / ``unmatched_truth``; unreadable or mis-sized pairs in ``problems``.
    """
    from aegir.store import image_files
    from aegir.utils.mask_metrics import mask_set_metrics

    pred = image_files.mask_files_by_stem(pred_dir)
    truth = image_files.mask_files_by_stem(truth_dir)
    problems: list[dict] = []

    def pairs():
        for stem in sorted(set(pred) & set(truth)):
            try:
                p, t = image_files.read_mask(pred[stem]) > 0, image_files.read_mask(truth[stem]) > 0
            except ValueError as exc:
                problems.append({"stem": stem, "reason": str(exc)})
                continue
            if p.shape != t.shape:
                problems.append({"stem": stem, "reason": f"prediction is {p.shape}, truth is {t.shape}"})
                continue
            yield stem, p, t

    return mask_set_metrics(pairs()) | {
        "unmatched_pred": sorted(set(pred) - set(truth)),
        "unmatched_truth": sorted(set(truth) - set(pred)),
        "problems": problems,
    }


# ---- grid plans ---------------------------------------------------------------------------------------------


def plan_grid(
    settings: Settings,
    plan_id: str,
    aoi: "shapely.Geometry",
    plan_level: int = 13,
    context_level: int = 10,
    label_datasets: Sequence[str] = (),
    builtup_by_cell: dict[str, float] | None = None,
    cell_boosts: dict[str, float] | None = None,
) -> pa.Table:
    """Cover ``aoi`` (EPSG:4326) with level-``plan_level`` S2 cells, rank them by nearby lakehouse labels and
    prior ``predicted_pv`` detections, and store the plan (table ``grid_plan``) so a run can resume cell by cell.

    ``cell_boosts`` (token → boost > 0, from the flywheel's find-more-like-this hook) put those cells first; given
    for a plan that already exists, they re-rank it (statuses are kept)."""
    import numpy as np
    import shapely

    con = ducklake.connect(settings)
    try:
        min_lon, min_lat, max_lon, max_lat = shapely.bounds(aoi).tolist()
        pad = 1.0  # degrees: labels just outside the AOI still inform the neighbourhood counts
        query = ducklake.LabelQuery(tuple(label_datasets), (min_lon - pad, min_lat - pad, max_lon + pad, max_lat + pad))
        has_labels = bool(ducklake.label_tables(con, settings))
        labels = ducklake.query_labels(con, settings, query) if has_labels else None
        label_lonlat = (np.column_stack([labels["centroid_lon"].to_numpy(), labels["centroid_lat"].to_numpy()])
                        if labels is not None else np.empty((0, 2)))
        detection_lonlat = ducklake.detection_centroids(con, settings)
        plan = run_stage(
            "grid_plan",
            ["grid_plan"],
            {"aoi_geometry": aoi, "plan_level": plan_level, "context_level": context_level,
             "label_lonlat": label_lonlat, "detection_lonlat": detection_lonlat,
             "builtup_by_cell": builtup_by_cell or {}, "cell_boosts": cell_boosts or {}},
        )["grid_plan"]
        ducklake.write_grid_plan(con, settings, plan_id, plan)
        if cell_boosts:
            ducklake.rerank_grid_plan(con, settings, plan_id, plan)
        return ducklake.read_grid_plan(con, settings, plan_id)
    finally:
        con.close()

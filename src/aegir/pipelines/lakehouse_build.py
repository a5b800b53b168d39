"""``aegir dataset build --from-lakehouse``: lakehouse labels × the imagery catalog → Mask Factory masks →
``training_data`` rows with lineage; ``aegir dataset lineage``; ``aegir dataset export-masks``.

Per image (all its prompts in one backend pass, the ``lakehouse_samples`` DAG): the catalogued file is read after
checking it is unchanged (content hash), its pixel ground truth (if catalogued) goes to ``truth_mask``, the backend's
masks to ``generated_mask``. Rows are committed in batches; then a ``dataset_builds`` record in the lakehouse pairs
the Lance version with the DuckLake snapshot the labels and catalog were read at.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aegir.config import Settings
from aegir.masks.base import MaskBackendError
from aegir.pipelines import run_stage
from aegir.pipelines.dataset import BUILD_BATCH, write_training_batch
from aegir.pipelines.imagery import join_labels_to_imagery
from aegir.store import ducklake, lance_io
from aegir.store.imagery_files import ImageryError, read_catalogued_image, truth_for
from aegir.utils.types import Chip

SAMPLE_OUTPUTS = ["lakehouse_samples", "unusable_prompts"]


@dataclass(frozen=True)
class LakehouseBuildReport:
    """Outcome of a lakehouse build: rows, the Lance version and DuckLake snapshot recorded together, skips."""

    location: str
    inserted: int
    updated: int
    version: int
    build_id: str
    ducklake_snapshot_id: int
    images: int
    prompts: int
    without_imagery: dict[str, int]
    skipped: list[dict] = field(default_factory=list)


def _prompt_rows_with_labels(prompts: pa.Table, labels: pa.Table) -> pa.Table:
    wkb = labels["geometry_wkb"].take(prompts["label_index"]) if prompts.num_rows else pa.array([], pa.binary())
    return prompts.append_column("label_wkb", wkb)


def _backend(name: str, options: dict | None, mask_backend: Any) -> Any:
    from aegir.masks import get_backend

    return mask_backend or get_backend(name, **(options or {}))


def _image_samples(row: dict, rows: pa.Table, backend: Any, chip_size: int | None, lineage: dict,
                   skipped: list[dict]) -> dict | None:
    """The samples of one catalogued image, or None (with the reason in ``skipped``) when it cannot be read."""
    try:
        chip = read_catalogued_image(row["uri"], row["image_id"], row["grid_convention"])
    except ImageryError as exc:
        skipped.append({"file": row["uri"], "reason": str(exc).removeprefix(f"{row['uri']}: ")})
        return None
    try:
        truth = truth_for(row["truth_uri"], chip.height, chip.width)
    except ImageryError as exc:
        skipped.append({"file": row["truth_uri"], "reason": f"ground truth not used: {exc}"})
        truth = None
    try:
        result = run_stage("lakehouse_samples", SAMPLE_OUTPUTS, {
            "image_chip": chip, "catalog_prompt_rows": rows, "mask_backend": backend, "truth_mask": truth,
            "chip_size": chip_size, "build_lineage": lineage})
    except MaskBackendError:
        raise  # the backend cannot run at all (weights, packages): stop with its message
    except Exception as exc:  # noqa: BLE001 - one image the backend fails on must not sink the build
        skipped.append({"file": row["uri"], "reason": f"mask backend {backend.name} failed on this image: "
                                                      f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"})
        return None
    skipped += [{"file": row["uri"], **item} for item in result["unusable_prompts"]]
    return result["lakehouse_samples"]


def build_training_from_lakehouse(
    settings: Settings,
    query: ducklake.LabelQuery,
    uri: str | None = None,
    backend: str = "offline",
    backend_options: dict | None = None,
    chip_size: int | None = 256,
    encoding: str = "raw",
    imagery_datasets: Sequence[str] = (),
    image_assignment: str = "all",
    name: str | None = None,
    progress: Any = None,
    mask_backend: Any = None,
) -> LakehouseBuildReport:
    """``training_data`` rows from the labels of ``query`` on the catalogued imagery (see the module docstring).

    ``chip_size``: pixels of a window centred on each label (None: one row per whole image); ``backend``: a Mask
    Factory backend name (``offline``, ``sam``, ``sam-hq``, ``sam2``, ``model``) built with ``backend_options``.
    Images that vanished or changed since registration, and unusable prompts, are skipped with the reason.
    """
    joined = join_labels_to_imagery(settings, query, imagery_datasets, image_assignment)
    model = _backend(backend, backend_options, mask_backend)
    prompts = _prompt_rows_with_labels(joined.prompts, joined.labels)
    table = lance_io.open_training_table(uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                         h3_resolution=settings.h3_resolution)
    build_id, started = str(uuid.uuid4()), dt.datetime.now(dt.UTC)
    lineage = {"ducklake_snapshot_id": joined.snapshot_id, "build_id": build_id, "backend": model.name,
               "backend_version": model.version, "backend_params_json": json.dumps(model.params, sort_keys=True,
                                                                                   default=str)}
    dataset = name or "+".join(sorted(set(joined.prompts["dataset"].to_pylist()))) or "lakehouse"
    params = {"backend": model.name, "backend_version": model.version, "backend_params": model.params,
              "build_id": build_id, "query": repr(query), "chip_size": chip_size}
    skipped: list[dict] = []
    pending: tuple[list[Chip], dict, dict] = ([], {}, {})
    totals = [0, 0]

    def flush() -> None:
        chips, masks, truth = pending
        if chips:
            result = write_training_batch(table, chips, masks, {}, dataset, encoding, f"mask_factory:{model.name}",
                                          params, truth=truth)
            totals[0] += result.inserted
            totals[1] += result.updated
        pending[0].clear(), pending[1].clear(), pending[2].clear()

    image_ids = prompts["image_id"].to_numpy(zero_copy_only=False) if prompts.num_rows else np.array([])
    for row in joined.catalog.to_pylist():
        rows = prompts.filter(pa.array(image_ids == row["image_id"]))
        samples = _image_samples(row, rows, model, chip_size, lineage, skipped) if rows.num_rows else None
        if progress:
            progress(1)
        if samples is None:
            continue
        pending[0].extend(samples["chips"]), pending[1].update(samples["masks"]), pending[2].update(samples["truth"])
        if len(pending[0]) >= BUILD_BATCH:
            flush()
    flush()
    _record(settings, table, build_id, joined.snapshot_id, dataset, params, totals, started)
    root, table_name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    return LakehouseBuildReport(f"{root}/{table_name}", totals[0], totals[1], table.version, build_id,
                                joined.snapshot_id, len(set(image_ids.tolist())), joined.prompts.num_rows,
                                joined.without_imagery, skipped)


def _record(settings: Settings, table: Any, build_id: str, snapshot: int, dataset: str, params: dict,
            totals: list[int], started: dt.datetime) -> None:
    record = pa.table({
        "build_id": [build_id], "table_uri": [str(table.uri)], "lance_version": [int(table.version)],
        "ducklake_snapshot_id": [int(snapshot)], "dataset": [dataset],
        "params_json": [json.dumps(params, sort_keys=True, default=str)], "rows_inserted": [totals[0]],
        "rows_updated": [totals[1]], "started_at": pa.array([started], pa.timestamp("us", tz="UTC")),
        "finished_at": pa.array([dt.datetime.now(dt.UTC)], pa.timestamp("us", tz="UTC"))})
    con = ducklake.connect(settings)
    try:
        ducklake.record_build(con, settings, record)
    finally:
        con.close()


def row_lineage(settings: Settings, sample_uuid: str, uri: str | None = None) -> dict:
    """The lineage of one ``training_data`` row and the record of the build that wrote it."""
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    where = lance_io.build_where_clause({"uuid": sample_uuid}, table.schema)
    rows = table.search().where(where).select(["uuid", "lineage", "metadata"]).limit(1).to_arrow().to_pylist()
    if not rows:
        raise lance_io.StoreError(f"no row {sample_uuid!r} in {table.uri}")
    row = rows[0]
    meta = row["metadata"]
    out = {"uuid": row["uuid"], "dataset": meta["dataset"], "source_file": meta["source_file"],
           "mask_source": meta["mask_source"], "table_version": int(table.version), "lineage": row["lineage"],
           "build": None}
    build_id = (row["lineage"] or {}).get("build_id")
    if build_id:
        con = ducklake.connect(settings)
        try:
            out["build"] = ducklake.read_build(con, settings, build_id)
        finally:
            con.close()
    return out


@dataclass(frozen=True)
class _Grid:
    """An image's grid for export: CRS (None on a pixel grid), transform, size, whether it is georeferenced."""

    name: str
    crs: Any
    transform: Any
    width: int
    height: int
    georeferenced: bool


def _export_name(uri: str) -> str:
    """``<stem>`` of a file, ``<shard stem>_row<i>_rev<r>`` of an EarthView catalog uri."""
    path, _, fragment = uri.partition("#")
    if not fragment:
        return Path(path).stem
    return f"{Path(path).stem}_" + "_".join(part.replace("=", "").replace("revisit", "rev")
                                            for part in fragment.split("&"))


def _catalog_grids(settings: Settings, image_ids: set[str]) -> dict[str, _Grid]:
    """The catalogued grid of each image id (uri → grid)."""
    from affine import Affine
    from rasterio.crs import CRS

    if not image_ids:
        return {}
    con = ducklake.connect(settings)
    try:
        rows = ducklake.read_imagery(con, settings, sorted(image_ids)).to_pylist()
    finally:
        con.close()
    return {r["uri"]: _Grid(_export_name(r["uri"]), CRS.from_user_input(r["crs"]) if r["crs"] else None,
                            Affine(*r["transform"]), r["width"], r["height"], bool(r["georeferenced"]))
            for r in rows}


def _file_grid(source: str) -> _Grid:
    from aegir.store.imagery_files import raster_header

    header = raster_header(source, allow_pixel_grid=True)
    return _Grid(_export_name(source), header.crs, header.transform, header.width, header.height,
                 header.grid_convention == "file")


def export_masks(settings: Settings, out_dir: str | Path, uri: str | None = None, dataset: str | None = None,
                 mask_target: str = "generated") -> dict:
    """Burn the rows' masks back onto each source image's grid (the catalogued grid for lakehouse rows, the file's
    for others): ``OUT/<image stem>.png`` (0/255, the image's size) and ``OUT/<image stem>.tif`` for images with a
    stored georeference. Returns {written, rows, skipped, out_dir}."""
    from aegir.store import mask_files
    from aegir.store.chip_codec import decode_chip

    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    where = lance_io.mask_target_filter(mask_target)
    if dataset:
        where += " AND " + lance_io.build_where_clause({"metadata.dataset": dataset}, table.schema)
    rows = table.search().where(where).select(["generated_mask", "truth_mask", "metadata", "lineage"]).limit(
        None).to_arrow()
    masks = lance_io.training_mask(rows, mask_target).to_pylist()
    metas, lineages = rows["metadata"].to_pylist(), [x or {} for x in rows["lineage"].to_pylist()]
    grids = _catalog_grids(settings, {x["image_id"] for x in lineages if x.get("image_id")})
    canvases: dict[str, tuple[_Grid | None, np.ndarray | None]] = {}
    skipped: list[dict] = []
    for stored, meta, lineage in zip(masks, metas, lineages):
        source = lineage.get("image_uri") or meta["source_file"]
        if source not in canvases:
            try:
                grid = grids.get(source) or _file_grid(source)
                canvases[source] = (grid, np.zeros((grid.height, grid.width), np.uint8))
            except ImageryError as exc:
                skipped.append({"file": source, "reason": str(exc).removeprefix(f"{source}: ")})
                canvases[source] = (None, None)
        grid, canvas = canvases[source]
        if grid is None:
            continue
        mask = decode_chip(stored, meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        col, row = ~grid.transform @ (meta["transform"][2], meta["transform"][5])
        col0, row0 = round(col), round(row)
        r0, c0 = max(row0, 0), max(col0, 0)
        r1, c1 = min(row0 + mask.shape[0], grid.height), min(col0 + mask.shape[1], grid.width)
        if r1 > r0 and c1 > c0:
            canvas[r0:r1, c0:c1] |= mask[r0 - row0:r1 - row0, c0 - col0:c1 - col0]
    out, written = Path(out_dir), {}
    for source, (grid, canvas) in canvases.items():
        if grid is None:
            continue
        written[grid.name] = str(mask_files.write_mask_png(canvas, out / f"{grid.name}.png"))
        if grid.georeferenced and grid.crs is not None:
            chip = Chip(canvas[None], grid.crs, grid.transform, float("nan"), ("mask",), source)
            mask_files.write_mask_geotiff(canvas, chip, out / f"{grid.name}.tif")
    return {"written": written, "rows": rows.num_rows, "skipped": skipped, "out_dir": str(out)}

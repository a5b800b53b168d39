"""Mask Factory jobs (``aegir masks generate|evaluate``): prompts → PV masks (PNG, GeoTIFF, polygons, report) and,
optionally, ``training_data.generated_mask``; predicted vs truth mask scores."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aegir.config import Settings
from aegir.pipelines import STAGES, build_driver
from aegir.pipelines.dataset import default_dataset_name, write_training_batch
from aegir.store import image_files, lance_io, mask_files, run_files
from aegir.utils import geo

if TYPE_CHECKING:
    import pandas as pd

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


def _prompt_file_names(prompts: pd.DataFrame) -> pd.Series:
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


def _unknown_image_names(prompts, images: list[Path], images_dir: str | Path) -> list[dict]:
    """Skips for prompt rows naming an image that is not in ``images_dir``."""
    named = _prompt_file_names(prompts).dropna()
    if not len(named):
        return []
    known = {p.name for p in images} | {p.stem for p in images}
    return [{"file": name, "reason": f"prompt file names an image that is not in {images_dir}"}
            for name in sorted(set(named)) if name not in known and Path(name).stem not in known]


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
    prompts are recorded in ``skipped``; the other images are still processed. An image whose prompts are all
    unusable gets an empty mask (the backend is not called; no ``training_data`` row); an image the backend fails
    on is skipped with the error and gets no mask. With ``lance_uri`` (or
    ``settings``) the masks are upserted into ``training_data.generated_mask`` (see :func:`upsert_generated_masks`).
    """
    from aegir.masks import get_backend

    out = Path(out_dir)
    images = image_files.list_image_files(images_dir)
    prompts = mask_files.read_prompt_file(prompts_file)
    model = mask_backend or get_backend(backend, **(backend_options or {}))
    dag = build_driver(STAGES["mask_factory"])
    skipped: list[dict] = _unknown_image_names(prompts, images, images_dir)
    written, frames, used, lance_items = {}, [], 0, []
    for path in images:
        if progress:
            progress(1)
        try:
            chip = mask_files.read_image_chip(path)
        except mask_files.MaskFileError as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        footprint = None if chip.crs == geo.PIXEL_GRID_CRS else geo.chip_footprint_wkb(chip)
        rows = _prompts_for_image(prompts, path, footprint)
        if rows.empty:
            mask = np.zeros((chip.height, chip.width), np.uint8)
            skipped.append({"file": str(path), "reason": "no prompts for this image: wrote an empty mask"})
            result_skips, polygons = [], None
        else:
            inputs = {"image_chip": chip, "image_prompt_rows": rows, "mask_backend": model}
            conversion = dag.execute(["prompt_conversion"], inputs=inputs)["prompt_conversion"]
            result_skips = conversion["skipped"]
            skipped += [{"file": str(path), **item} for item in result_skips]
            if not len(conversion["prompts"]):  # every prompt unusable: the backend is not asked, the mask is empty
                mask, polygons, rows = np.zeros((chip.height, chip.width), np.uint8), None, None
                skipped.append({"file": str(path), "reason": f"no usable prompts ({len(result_skips)} skipped): "
                                                             "wrote an empty mask"})
            else:
                try:
                    result = dag.execute(list(MASK_OUTPUTS), inputs=inputs,
                                         overrides={"prompt_conversion": conversion})
                except Exception as exc:  # noqa: BLE001 — one image failing in the backend never sinks the batch
                    message = " ".join(str(exc).split())
                    skipped.append({"file": str(path), "reason": f"mask backend {model.name} failed on this image "
                                                                 f"({type(exc).__name__}: {message}); no mask written"})
                    continue
                mask, polygons = result["union_mask"], result["mask_polygons"]
                used += len(rows) - len(result_skips)
        written[path.stem] = str(mask_files.write_mask_png(mask, out / f"{path.stem}.png"))
        if chip.georeferenced and chip.extras.get("grid_convention") == "file":
            mask_files.write_mask_geotiff(mask, chip, out / "geotiff" / f"{path.stem}.tif")
        if polygons is not None and len(polygons):
            frames.append(polygons)
        if rows is not None and not rows.empty and chip.crs != geo.PIXEL_GRID_CRS:
            lance_items.append((chip, path.stem, mask, polygons))
    polygons_out = _write_all_polygons(frames, Path(polygons_path) if polygons_path else out /
                                       "mask_polygons.geojson")
    report = MaskReport(str(out), model.name, model.version, written, used, skipped, str(polygons_out))
    if lance_uri is not None or settings is not None:
        report.lance = upsert_generated_masks(settings or Settings(), lance_items, model, lance_uri,
                                              dataset or default_dataset_name(images_dir))
    run_files.write_json(vars(report), out / "report.json")
    return report


def _write_all_polygons(frames: list, path: Path) -> Path:
    """Georeferenced mask polygons → ``path`` (EPSG:4326, always written); polygons of images without a
    georeference → ``<path stem>_pixels.geojson`` beside it, in pixel coordinates (x = column, y = row)."""
    import geopandas as gpd
    import pandas as pd

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

    ``items``: (chip, file stem, (H, W) mask, polygons GeoDataFrame or None) per image. The row uuid is
    uuid5(``dataset:<stem>``), the same key ``aegir dataset build --images`` uses, so a mask for a tile already in
    the table gets the generated mask beside its ground truth (``truth_mask`` is carried over, never replaced).
    Provenance: backend name, version and parameters.
    """
    import shapely

    if not items:
        return {"inserted": 0, "updated": 0, "rows": 0}
    table = lance_io.open_training_table(uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                         h3_resolution=settings.h3_resolution)
    chips, masks = [], {}
    for chip, stem, mask, polygons in items:
        footprint = shapely.from_wkb(geo.chip_footprint_wkb(chip))
        prompt = shapely.union_all(polygons.geometry.values) if polygons is not None and len(polygons) \
            and polygons.crs is not None else footprint
        chips.append(dataclasses.replace(chip, extras={**chip.extras, "sample_id": stem,
                                                       "prompt_wkb": shapely.to_wkb(prompt)}))
        masks[stem] = mask
    params = {"backend": mask_backend.name, "backend_params": mask_backend.params,
              "backend_version": mask_backend.version}
    truth = lance_io.stored_truth_masks(table, dataset, list(masks))  # ground truth stays in its own column
    result = write_training_batch(table, chips, masks, {}, dataset, "raw", f"mask_factory:{mask_backend.name}",
                                  params, truth=truth)
    return {"inserted": result.inserted, "updated": result.updated, "version": result.version, "rows": len(chips)}


def evaluate_masks(pred_dir: str | Path, truth_dir: str | Path) -> dict:
    """IoU / F1 of predicted masks against truth masks matched by file stem (PV where value > 0).

    Metrics as defined in :mod:`aegir.utils.mask_metrics`. Stems only on one side are listed in
    ``unmatched_pred`` / ``unmatched_truth``; unreadable or mis-sized pairs in ``problems``.
    """
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

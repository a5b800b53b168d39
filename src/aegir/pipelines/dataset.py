"""``training_data`` jobs (``aegir dataset build|info``): image tiles (+ ground-truth masks, + Sentinel-2) → chips →
rows of the LanceDB ``training_data`` table (the lakehouse path is :mod:`aegir.pipelines.lakehouse_build`).

Each batch runs the ``training_samples`` DAG to ``training_rows`` and is written by :func:`write_training_batch`
through :mod:`aegir.store.lance_io` (one ``merge_insert`` commit per batch, scalar indexes refreshed after).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aegir.config import Settings
from aegir.pipelines import run_stage
from aegir.store import image_files, lance_io
from aegir.utils import geo
from aegir.utils.types import Chip

if TYPE_CHECKING:
    import lancedb

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


def write_training_batch(table: lancedb.table.Table, chips: list[Chip], masks: dict[str, np.ndarray],
                         msi: dict[str, Chip], dataset: str, encoding: str, mask_source: str,
                         params: dict, truth: dict[str, np.ndarray] | None = None,
                         ignore: dict[str, np.ndarray] | None = None) -> lance_io.UpsertResult:
    """Upsert one ``training_data`` row per chip (keyed by uuid, one commit); a table without its scalar indexes
    gets them (one version each, the first time only; stale ones are refreshed by ``aegir dataset optimize``).

    ``masks``: sample_id → (H, W) 0/1 generated mask on the chip grid; ``truth``: sample_id → pixel ground truth
    (its own column, never replaced by a generated mask); ``ignore``: sample_id → (H, W) bool pixels of the
    generated mask with no opinion (stored as ``lance_io.MASK_IGNORE``, left out of the loss); ``msi``: sample_id → co-registered Sentinel-2 chip;
    ``params``: provenance parameters stored with every row (see :mod:`aegir.dataflows.training_sample_builder`).
    """
    rows = run_stage("training_samples", ["training_rows"], {
        "sample_chips": chips, "sample_masks": masks, "truth_masks": truth or {}, "ignore_masks": ignore or {}, "msi_chips": msi, "dataset_name": dataset,
        "chip_encoding": encoding, "mask_source": mask_source, "provenance_params": params,
        "s2_levels": lance_io.stored_s2_levels(table.schema), "h3_resolution": lance_io.stored_h3_resolution(table.schema),
    })["training_rows"]
    if rows.num_rows == 0:
        result = lance_io.UpsertResult(0, 0, table.version)
    else:
        result = lance_io.upsert_training_rows(table, rows)
    lance_io.ensure_scalar_indexes(table, missing_only=True)
    return result


def msi_chips_for(chips: list[Chip], msi_dir: str | None, processing_baseline: str | None = None
                  ) -> tuple[dict[str, Chip], list[dict]]:
    """Co-registered Sentinel-2 chips (sample_id → Chip) for chips inside the scene in ``msi_dir``, and the chips
    without one as skipped {file, reason}. The DN offset follows the product's processing baseline, read from its
    metadata or given as ``processing_baseline``; neither → :class:`~aegir.store.msi_files.MsiError`."""
    if not msi_dir:
        return {}, []
    from aegir.store import msi_files as msi

    files = msi.msi_band_files(msi_dir)
    grid = msi.msi_scene_grid(files)
    radiometry = msi.msi_radiometry(msi_dir, processing_baseline)
    out, skipped = {}, []
    for chip in chips:
        try:
            out[chip.extras["sample_id"]] = msi.msi_chip_for_bounds(files, grid, chip.bounds, chip.crs.to_string(),
                                                                    radiometry.dn_offset,
                                                                    msi_product_level=radiometry.product_level)
        except msi.MsiError as exc:
            skipped.append({"file": chip.source, "reason": f"no MSI chip: {exc}"})
    return out, skipped


def _tile_chip(path: Path, skipped: list[dict]) -> Chip | None:
    """A loaded tile Chip, or None with the reason appended to ``skipped`` (corrupt, no georeference, all nodata)."""
    from aegir.store.rasters import named_tile_chip

    try:
        chip = named_tile_chip(str(path))
    except (ValueError, OSError) as exc:
        skipped.append({"file": str(path), "reason": str(exc)})
        return None
    if chip.valid is not None and not chip.valid.any():
        skipped.append({"file": str(path), "reason": "every pixel is nodata"})
        return None
    return chip


def default_dataset_name(images_dir: str | Path) -> str:
    """The images folder's name, or its parent's when it is called ``images`` (``jiang_pv01/images`` → jiang_pv01)."""
    folder = Path(images_dir).resolve()
    return folder.parent.name if folder.name == "images" else folder.name


def load_tile_chips(paths: list[Path], masks_by_stem: dict[str, Path], skipped: list[dict]
                    ) -> tuple[list[Chip], dict[str, np.ndarray]]:
    """(chips with ``sample_id``/``prompt_wkb`` extras, {stem: (H, W) uint8 mask}) of image tiles; unusable
    tiles and masks are appended to ``skipped`` — the per-tile steps of ``build_dataset_from_images``."""
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


def _location(settings: Settings, uri: str | None) -> str:
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    return f"{root}/{name}"


def build_dataset_from_images(
    settings: Settings,
    images_dir: str | Path,
    masks_dir: str | Path | None = None,
    uri: str | None = None,
    dataset: str | None = None,
    encoding: str = "raw",
    msi_dir: str | None = None,
    progress: Any = None,
    processing_baseline: str | None = None,
    image_paths: list[Path] | None = None,
) -> BuildReport:
    """One ``training_data`` row per image tile; masks matched by file stem (PV where > 0); prompt = tile footprint.
    ``image_paths``: only these images (e.g. one part of a hold-out split) instead of every image of the folder.

    Tiles that cannot be used (unreadable, no georeference, all nodata, mask of another size) are skipped with the
    reason; the rest of the build continues. Rows are keyed by uuid5(dataset:stem), so a rebuild upserts.
    """
    images = list(image_paths) if image_paths is not None else image_files.list_image_files(images_dir)
    masks_by_stem = image_files.mask_files_by_stem(masks_dir)
    dataset = dataset or default_dataset_name(images_dir)
    table = lance_io.open_training_table(uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                         h3_resolution=settings.h3_resolution)
    params = {"images_dir": str(Path(images_dir).resolve()), "masks_dir": str(masks_dir) if masks_dir else None}
    skipped: list[dict] = []
    totals = [0, 0]
    for start in range(0, len(images), BUILD_BATCH):
        batch = images[start : start + BUILD_BATCH]
        chips, masks = load_tile_chips(batch, masks_by_stem, skipped)
        if progress:
            progress(len(batch))
        msi_chips, msi_skipped = msi_chips_for(chips, msi_dir, processing_baseline)
        skipped += msi_skipped
        result = write_training_batch(table, chips, {}, msi_chips, dataset, encoding, "ground_truth", params,
                                      truth=masks)
        totals = [totals[0] + result.inserted, totals[1] + result.updated]
    return BuildReport(_location(settings, uri), totals[0], totals[1], table.version, skipped)


def dataset_info(settings: Settings, uri: str | None = None) -> dict:
    """Rows, versions, size, S2 coverage and class balance of a ``training_data`` table."""
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return lance_io.table_summary(table) | lance_io.class_balance(table)


def referenced_versions(table_uri: str, folders: list[str | Path]) -> list[int]:
    """The versions of the Lance table at ``table_uri`` that the checkpoints (``*.ckpt``, flywheel rounds included)
    under ``folders`` were trained on; other tables' checkpoints and unreadable files are passed over."""
    from aegir.store import training_files

    versions = set()
    for folder in folders:
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"{folder}: no such folder of checkpoints")
        for path in sorted(Path(folder).rglob("*.ckpt")):
            try:
                payload = training_files.read_checkpoint(path)
            except (ValueError, OSError, RuntimeError):
                continue
            if str(payload.get("dataset_uri", "")).rstrip("/") == table_uri.rstrip("/"):
                versions.add(int(payload["data_version"]))
    return sorted(versions)


def optimize_dataset(settings: Settings, uri: str | None = None, older_than_days: float = 7.0,
                     keep: list[int] | None = None, keep_from: list[str | Path] | None = None,
                     remove_orphans: bool = False) -> lance_io.TableUpkeep:
    """``aegir dataset optimize``: compact the table, bring its indexes up to date and remove untagged versions
    older than ``older_than_days``, keeping ``keep`` and every version a checkpoint under ``keep_from`` names
    (training tags its own version already); ``remove_orphans``: also delete files no version references."""
    import datetime as dt

    if older_than_days < 0:
        raise ValueError(f"--older-than-days must be >= 0, got {older_than_days}")
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    versions = set(keep or []) | set(referenced_versions(table.to_lance().uri, list(keep_from or [])))
    return lance_io.optimize_table(table, dt.timedelta(days=older_than_days), sorted(versions), remove_orphans)


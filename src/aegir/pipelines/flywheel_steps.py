"""The steps of one flywheel round (see :mod:`aegir.pipelines.flywheel`) but the embedding hooks
(:mod:`aegir.pipelines.flywheel_hooks`): each takes the :class:`RoundContext` and returns a JSON-able result dict.

Everything a step reads or writes goes through the store layer: the training table through
:mod:`aegir.store.lance_io`, the run folder's files (``round_<k>/…``) through :mod:`aegir.store.run_files`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from aegir.config import Settings
from aegir.store import run_files

SEED_DATASET = "jiang_pv01"
BACKFILL_DATASET = "flywheel_backfill"
MINED_DATASET = "flywheel_mined"


@dataclass
class RoundContext:
    """One round of one flywheel run: settings, config, the run folder ``out`` and the recorded step results."""

    settings: Settings
    config: Any  # FlywheelConfig
    out: Path
    round_index: int
    state: Any  # FlywheelState

    @property
    def round_dir(self) -> Path:
        return run_files.ensure_dir(self.out / f"round_{self.round_index}")

    @property
    def table_uri(self) -> str:
        return str(Path(self.settings.lancedb_root) / "training_data")

    def earlier(self, step: str, round_index: int | None = None) -> dict:
        result = self.state.result(self.round_index if round_index is None else round_index, step)
        if result is None:
            raise RuntimeError(f"flywheel round {self.round_index}: step {step!r} has no recorded result")
        return result


def training_table(context: RoundContext):
    """The run's ``training_data`` table (LanceDB), created when missing."""
    from aegir.store import lance_io

    settings = context.settings
    return lance_io.open_training_table(context.table_uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                        h3_resolution=settings.h3_resolution)


def _table_columns(context: RoundContext, version: int, columns: dict[str, str]) -> pa.Table:
    """``columns`` (name → column path, e.g. ``metadata.dataset``) of every row of the table at ``version``."""
    from aegir.store import lance_io

    return lance_io.read_version(training_table(context), version, columns)


def _masks_by_source(context: RoundContext, version: int) -> dict[str, int]:
    sources = _table_columns(context, version, {"source": "metadata.mask_source"})["source"].to_pylist()
    return dict(Counter(s or "none" for s in sources))


def round_detections(context: RoundContext, round_index: int | None = None):
    """The detections (GeoDataFrame, EPSG:4326) of a round's infer step; empty when it wrote none."""
    import geopandas as gpd

    path = context.out / f"round_{round_index or context.round_index}" / "infer" / "detections.parquet"
    frame = run_files.read_geoparquet(path, missing_ok=True)
    return frame if frame is not None else gpd.GeoDataFrame(geometry=[], crs="EPSG:4326")


def round_decisions(context: RoundContext, round_index: int | None = None) -> pa.Table:
    """The validation decisions (``decision``, ``detection_id``, evidence) a round's validate step wrote."""
    return run_files.read_parquet(context.earlier("validate", round_index)["decisions"])


def validated(context: RoundContext):
    """(detections, validation decisions, detection_id → tile Chip) of this round."""
    detections = round_detections(context)
    decisions = round_decisions(context)
    tiles = detection_tiles(detections, Path(context.config.region_tiles)) if len(detections) else {}
    return detections, decisions, tiles


def detection_tiles(detections, tiles_dir: Path) -> dict[str, Any]:
    """detection_id → the region tile (Chip) whose footprint holds the detection's centroid. Footprints come from
    the tile index (file headers); only the tiles that hold a detection are read."""
    import shapely

    from aegir.store import mask_files, region_files

    tiles, _ = region_files.tile_index(tiles_dir)
    tree = shapely.STRtree([t.footprint for t in tiles])
    loaded: dict[int, Any] = {}
    out = {}
    for detection_id, geometry in zip(detections["detection_id"].astype(str), detections.geometry):
        hits = tree.query(shapely.centroid(geometry), predicate="within")
        if len(hits):
            index = int(hits[0])
            if index not in loaded:
                loaded[index] = mask_files.read_image_chip(tiles[index].path)
            out[detection_id] = loaded[index]
    return out


def previous_boosts(context: RoundContext) -> dict[str, float]:
    """Cell boosts the previous round's find_similar step made (empty in round 1 or when it was off)."""
    if context.round_index == 1:
        return {}
    previous = context.state.result(context.round_index - 1, "find_similar") or {}
    return dict(previous.get("boosts") or {})


# ---- steps -------------------------------------------------------------------------------------------------


def step_ingest(context: RoundContext) -> dict:
    """The shared label sets into DuckLake (no-op rows on later rounds: imports are idempotent)."""
    from aegir.pipelines.labels import import_labels
    from aegir.sample_data import SAMPLE_LABEL_SETS

    if not context.config.import_labels:
        return {"skipped": "import_labels = false"}
    data = Path(context.settings.sample_data_dir)
    added = {}
    for item in SAMPLE_LABEL_SETS:
        report = import_labels(context.settings, item.path(data), item.dataset, doi=item.doi)
        added[item.dataset] = report.commit.inserted
    return {"new_label_rows": added}


def step_masks(context: RoundContext) -> dict:
    """Round 1: offline Mask Factory on the seed tiles (one box per ground-truth component), scored against the
    ground truth. Later rounds: the backfill of the previous round made this round's new masks."""
    from aegir.pipelines.masks import evaluate_masks, generate_masks
    from aegir.store.mask_files import write_component_box_prompts

    cfg = context.config
    if context.round_index > 1:
        previous = context.earlier("backfill", context.round_index - 1)
        return {"new_masks": previous.get("backfilled", 0), "backend": "model (previous round's backfill)"}
    prompts = context.round_dir / "seed_box_prompts.csv"
    count = write_component_box_prompts(cfg.seed_images, cfg.seed_masks, prompts)
    report = generate_masks(cfg.seed_images, prompts, "offline", context.round_dir / "masks")
    quality = evaluate_masks(context.round_dir / "masks", cfg.seed_masks)
    return {"prompts": count, "masks": len(report.written), "backend": "offline",
            "mean_iou_vs_ground_truth": quality["mean_iou"], "pixel_iou_vs_ground_truth": quality["pixel_iou"]}


def step_dataset(context: RoundContext) -> dict:
    """Round 1 upserts the seed tiles with their ground-truth masks; every round pins the version it trains on."""
    from aegir.pipelines.dataset import build_dataset_from_images

    cfg = context.config
    if context.round_index == 1:
        build_dataset_from_images(context.settings, cfg.seed_images, cfg.seed_masks, context.table_uri, SEED_DATASET)
    table = training_table(context)
    version = int(table.version)
    return {"version": version, "rows": table.count_rows(), "masks_by_source": _masks_by_source(context, version)}


def step_train(context: RoundContext) -> dict:
    """A short, time-capped CPU training run on the pinned version."""
    from aegir.training.config import TrainConfig
    from aegir.training.train import run_training

    cfg = context.config
    version = context.earlier("dataset")["version"]
    config = TrainConfig(max_epochs=cfg.train_max_epochs, max_minutes=cfg.train_max_minutes,
                         batch_size=cfg.train_batch_size, dataset_version=version, wandb=False, progress_bar=False,
                         accelerator="cpu").replace(**cfg.train_overrides)
    result = run_training(context.table_uri, config, context.round_dir / "train", context.settings.lancedb_root)
    return {"checkpoint": result.best_checkpoint, "data_version": result.data_version,
            "split_counts": result.split_counts, "epochs": result.epochs,
            "val_iou": result.best_metrics.get("val/iou"), "val_mean_iou": result.best_metrics.get("val/mean_iou")}


def step_infer(context: RoundContext) -> dict:
    """Region inference over the region tiles with this round's checkpoint; cells the previous round's
    find_similar step boosted are planned (and run) first."""
    from aegir.pipelines import region
    from aegir.store import ducklake

    cfg = context.config
    checkpoint = context.earlier("train")["checkpoint"]
    boosts = previous_boosts(context)
    report = region.infer_region(context.settings, checkpoint, context.round_dir / "infer",
                                 tiles_dir=cfg.region_tiles, pv_threshold=cfg.infer_threshold,
                                 plan_level=cfg.plan_level, cell_boosts=boosts)
    con = ducklake.connect(context.settings)
    try:
        order = ducklake.read_grid_plan(con, context.settings, report.plan_id)["cell_token"].to_pylist()
    finally:
        con.close()
    return _jsonable(report) | {"boosted_ranks": {t: order.index(t) for t in boosts if t in order}}


def _jsonable(report: Any) -> dict:
    import dataclasses

    data = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(report)
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in data.items()}


def step_validate(context: RoundContext) -> dict:
    """Accept / reject / needs_review per detection (score and shape; MSI evidence when a scene covers it)."""
    from aegir.dataflows import validation

    cfg = context.config
    detections = round_detections(context)
    thresholds = validation.ValidationThresholds(min_score=cfg.min_score, min_area_m2=cfg.min_area_m2,
                                                 min_rectangularity=cfg.min_rectangularity, require_msi=False)
    geometries = list(detections.geometry)
    n = len(geometries)
    shape = validation.shape_evidence(geometries) if n else {"area_m2": np.zeros(0), "rectangularity": np.zeros(0)}
    no_msi = {name: np.full(n, np.nan) for name in validation.INDEX_NAMES}
    decisions = validation.validation_decisions(detections["score"].to_numpy() if n else np.zeros(0), no_msi,
                                                np.full(n, np.nan), shape, thresholds)
    ids = detections["detection_id"].astype(str).tolist() if n else []
    path = run_files.write_parquet(decisions.append_column("detection_id", pa.array(ids, pa.string())),
                                   context.round_dir / "validation.parquet")
    counts = Counter(decisions["decision"].to_pylist())
    result = {"detections": n, "accepted": counts.get("accept", 0), "rejected": counts.get("reject", 0),
              "needs_review": counts.get("needs_review", 0), "decisions": str(path)}
    result["held_out"] = _held_out_scores(context)
    if context.round_index > 1:  # accepted detections of this round vs the previous round's
        previous = _accepted_geometries(context, context.round_index - 1)
        accepted = [g for g, d in zip(geometries, decisions["decision"].to_pylist()) if d == "accept"]
        result["agreement_with_previous_round"] = validation.object_level_scores(accepted, previous)
    return result


def _held_out_scores(context: RoundContext) -> dict:
    """The round's model on the seed tiles of its test split (cells it never trained on) against their ground
    truth: object-level precision / recall / F1 at IoU ≥ 0.5 and pixel IoU."""
    from aegir.pipelines.predict import object_and_pixel_scores

    train = context.earlier("train")
    test = set(run_files.read_json(Path(train["checkpoint"]).parent / "split.json")["uuids"]["test"])
    rows = _table_columns(context, train["data_version"], {"uuid": "uuid", "sample_id": "metadata.sample_id",
                                                           "dataset": "metadata.dataset"}).to_pylist()
    stems = [r["sample_id"] for r in rows if r["uuid"] in test and r["dataset"] == SEED_DATASET]
    return object_and_pixel_scores(train["checkpoint"], context.config.seed_images, context.config.seed_masks,
                                   stems, device="cpu")


def _accepted_geometries(context: RoundContext, round_index: int) -> list:
    detections = round_detections(context, round_index)
    decisions = round_decisions(context, round_index)["decision"].to_pylist()
    return [g for g, d in zip(detections.geometry, decisions) if d == "accept"]



def step_backfill(context: RoundContext) -> dict:
    """Accepted detections → chips + model-refined masks, rejected → hard negatives; one upsert each."""
    from aegir.masks import get_backend
    from aegir.pipelines import run_stage
    from aegir.pipelines.dataset import write_training_batch

    detections, decisions, tiles = validated(context)
    if not len(detections):
        return {"backfilled": 0, "hard_negatives": 0, "version": int(training_table(context).version)}
    checkpoint = context.earlier("train")["checkpoint"]
    backend = get_backend("model", checkpoint=checkpoint)
    inputs = {"detections": detections, "validation_decisions": decisions, "detection_tiles": tiles,
              "backfill_chip_px": context.config.backfill_chip_px, "mask_backend": backend,
              "max_backfill": context.config.max_backfill, "max_hard_negatives": context.config.max_hard_negatives}
    result = run_stage("backfill", ["accepted_chips", "refined_masks", "hard_negative_chips", "hard_negative_masks"],
                       inputs)
    table = training_table(context)
    written = {"backfilled": 0, "hard_negatives": 0}
    for key, chips, masks, source in (("backfilled", result["accepted_chips"], result["refined_masks"], "flywheel:model"),
                                      ("hard_negatives", result["hard_negative_chips"], result["hard_negative_masks"],
                                       "hard_negative")):
        if chips:  # hard negatives are empty masks from rejected detections: no backend drew them
            params = {"round": context.round_index, "model_checkpoint": checkpoint,
                      "backend": backend.name if key == "backfilled" else None, "backend_version": backend.version}
            write_training_batch(table, chips, masks, {}, BACKFILL_DATASET, "raw", source, params)
            written[key] = len(chips)
    table = training_table(context)
    looks = _round_quicklooks(context, detections, decisions, tiles)
    return written | {"version": int(table.version), "rows": table.count_rows(), "quicklooks": looks}


def _round_quicklooks(context: RoundContext, detections, decisions: pa.Table, tiles: dict) -> dict:
    """``round_<k>/quicklooks/detections/`` (the busiest tiles, detections outlined by decision) and
    ``round_<k>/quicklooks/backfill/`` (this round's backfilled and hard-negative chips with their masks)."""
    from aegir.pipelines.quicklook import detection_quicklooks, quicklook_training_data

    out = context.round_dir / "quicklooks"
    by_id = dict(zip(decisions["detection_id"].to_pylist(), decisions["decision"].to_pylist()))
    ordered = [by_id.get(i, "needs_review") for i in detections["detection_id"].astype(str)]
    shown = detection_quicklooks(detections, ordered, tiles, out / "detections")
    backfill = quicklook_training_data(context.settings, context.table_uri, out / "backfill",
                                       {"metadata.dataset": BACKFILL_DATASET,
                                        "metadata.provenance.round": context.round_index}, limit=16)
    return {"detections": shown["contact_sheet"], "backfill": backfill["contact_sheet"]}

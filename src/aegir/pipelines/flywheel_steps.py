"""The steps of one flywheel round (see :mod:`aegir.pipelines.flywheel`); each returns a JSON-able result dict."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from aegir.config import Settings

SEED_DATASET = "jiang_pv01"
BACKFILL_DATASET = "flywheel_backfill"
MINED_DATASET = "flywheel_mined"


@dataclass
class RoundContext:
    settings: Settings
    config: Any  # FlywheelConfig
    out: Path
    round_index: int
    state: Any  # FlywheelState

    @property
    def round_dir(self) -> Path:
        path = self.out / f"round_{self.round_index}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def table_uri(self) -> str:
        return str(Path(self.settings.lancedb_root) / "training_data")

    def earlier(self, step: str, round_index: int | None = None) -> dict:
        result = self.state.result(self.round_index if round_index is None else round_index, step)
        if result is None:
            raise RuntimeError(f"flywheel round {self.round_index}: step {step!r} has no recorded result")
        return result


def _table(context: RoundContext):
    from aegir.store import lance_io

    return lance_io.open_training_table(context.table_uri, context.settings.lancedb_root)


def _masks_by_source(context: RoundContext, version: int) -> dict[str, int]:
    table = _table(context).to_lance().checkout_version(version)
    sources = table.to_table(columns={"source": "metadata.mask_source"})["source"].to_pylist()
    return dict(Counter(s or "none" for s in sources))


# ---- steps -------------------------------------------------------------------------------------------------


def step_ingest(context: RoundContext) -> dict:
    """The shared label sets into DuckLake (no-op rows on later rounds: imports are idempotent)."""
    from aegir import pipelines
    from aegir.sample_data import SAMPLE_LABEL_SETS

    if not context.config.import_labels:
        return {"skipped": "import_labels = false"}
    data = Path(context.settings.sample_data_dir)
    added = {}
    for item in SAMPLE_LABEL_SETS:
        report = pipelines.import_labels(context.settings, item.path(data), item.dataset, doi=item.doi)
        added[item.dataset] = report.commit.inserted
    return {"new_label_rows": added}


def step_masks(context: RoundContext) -> dict:
    """Round 1: offline Mask Factory on the seed tiles (one box per ground-truth component), scored against the
    ground truth. Later rounds: the backfill of the previous round made this round's new masks."""
    from aegir import pipelines
    from aegir.store.mask_files import write_component_box_prompts

    cfg = context.config
    if context.round_index > 1:
        previous = context.earlier("backfill", context.round_index - 1)
        return {"new_masks": previous.get("backfilled", 0), "backend": "model (previous round's backfill)"}
    prompts = context.round_dir / "seed_box_prompts.csv"
    count = write_component_box_prompts(cfg.seed_images, cfg.seed_masks, prompts)
    report = pipelines.generate_masks(cfg.seed_images, prompts, "offline", context.round_dir / "masks")
    quality = pipelines.evaluate_masks(context.round_dir / "masks", cfg.seed_masks)
    return {"prompts": count, "masks": len(report.written), "backend": "offline",
            "mean_iou_vs_ground_truth": quality["mean_iou"], "pixel_iou_vs_ground_truth": quality["pixel_iou"]}


def step_dataset(context: RoundContext) -> dict:
    """Round 1 upserts the seed tiles with their ground-truth masks; every round pins the version it trains on."""
    from aegir import pipelines

    cfg = context.config
    if context.round_index == 1:
        pipelines.build_dataset_from_images(context.settings, cfg.seed_images, cfg.seed_masks, context.table_uri,
                                            SEED_DATASET)
    table = _table(context)
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


def _previous_boosts(context: RoundContext) -> dict[str, float]:
    """Cell boosts the previous round's find_similar step made (empty in round 1 or when it was off)."""
    if context.round_index == 1:
        return {}
    previous = context.state.result(context.round_index - 1, "find_similar") or {}
    return dict(previous.get("boosts") or {})


def step_infer(context: RoundContext) -> dict:
    """Region inference over the region tiles with this round's checkpoint; cells the previous round's
    find_similar step boosted are planned (and run) first."""
    from aegir.pipelines import region
    from aegir.store import ducklake

    cfg = context.config
    checkpoint = context.earlier("train")["checkpoint"]
    boosts = _previous_boosts(context)
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


def _detections(context: RoundContext, round_index: int | None = None):
    import geopandas as gpd

    path = context.out / f"round_{round_index or context.round_index}" / "infer" / "detections.parquet"
    return gpd.read_parquet(path) if path.is_file() else gpd.GeoDataFrame(geometry=[], crs="EPSG:4326")


def step_validate(context: RoundContext) -> dict:
    """Accept / reject / needs_review per detection (score and shape; MSI evidence when a scene covers it)."""
    from aegir.dataflows import validation

    cfg = context.config
    detections = _detections(context)
    thresholds = validation.ValidationThresholds(min_score=cfg.min_score, min_area_m2=cfg.min_area_m2,
                                                 min_rectangularity=cfg.min_rectangularity, require_msi=False)
    geometries = list(detections.geometry)
    n = len(geometries)
    shape = validation.shape_evidence(geometries) if n else {"area_m2": np.zeros(0), "rectangularity": np.zeros(0)}
    no_msi = {name: np.full(n, np.nan) for name in validation.INDEX_NAMES}
    decisions = validation.validation_decisions(detections["score"].to_numpy() if n else np.zeros(0), no_msi,
                                                np.full(n, np.nan), shape, thresholds)
    path = context.round_dir / "validation.parquet"
    ids = detections["detection_id"].astype(str).tolist() if n else []
    pq.write_table(decisions.append_column("detection_id", pa.array(ids, pa.string())), path)
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
    import json

    from aegir.training.evaluate import object_and_pixel_scores

    train = context.earlier("train")
    test = set(json.loads((Path(train["checkpoint"]).parent / "split.json").read_text())["uuids"]["test"])
    table = _table(context).to_lance().checkout_version(train["data_version"])
    rows = table.to_table(columns={"uuid": "uuid", "sample_id": "metadata.sample_id",
                                   "dataset": "metadata.dataset"}).to_pylist()
    stems = [r["sample_id"] for r in rows if r["uuid"] in test and r["dataset"] == SEED_DATASET]
    return object_and_pixel_scores(train["checkpoint"], context.config.seed_images, context.config.seed_masks,
                                   stems, device="cpu")


def _accepted_geometries(context: RoundContext, round_index: int) -> list:
    detections = _detections(context, round_index)
    decisions = pq.read_table(context.earlier("validate", round_index)["decisions"])["decision"].to_pylist()
    return [g for g, d in zip(detections.geometry, decisions) if d == "accept"]


def _encoder(context: RoundContext):
    from aegir.training.embedder import encoder_from_checkpoint

    return encoder_from_checkpoint(context.earlier("train")["checkpoint"], "cpu")


def step_embed_tiles(context: RoundContext) -> dict:
    """Every ``backfill_chip_px``² window of the region tiles embedded with this round's encoder (idempotent: a
    resumed step embeds only the windows still missing); skipped when both embedding hooks are off."""
    from aegir.pipelines import tile_search

    cfg = context.config
    if not (cfg.mine_hard_negatives or cfg.find_similar_tiles):
        return {"skipped": "mine_hard_negatives and find_similar_tiles are false"}
    report = tile_search.embed_region_tiles(context.settings, _encoder(context), cfg.region_tiles, cfg.plan_level,
                                            cfg.backfill_chip_px)
    return {"model": report.model, "region": report.region, "windows": report.windows,
            "embedded": report.embedded, "skipped_existing": report.skipped_existing, "cells": report.cells,
            "version": report.version}


def _validated(context: RoundContext):
    """(detections, validation decisions, detection_id → tile Chip) of this round."""
    detections = _detections(context)
    decisions = pq.read_table(context.earlier("validate")["decisions"])
    tiles = _detection_tiles(detections, Path(context.config.region_tiles)) if len(detections) else {}
    return detections, decisions, tiles


def step_mine_negatives(context: RoundContext) -> dict:
    """Hook (a): the tile windows nearest (cosine, this round's encoder) to the rejected detections, proposed as
    negatives in ``round_<k>/mined_negatives.parquet`` with their provenance (round, source detection, distance).

    With ``add_mined_negatives`` they also become empty-mask chips in ``training_data`` (dataset
    ``flywheel_mined``, mask source ``mined_negative``, provenance.round / source_detection / params_json distance).
    Why writing them unreviewed is acceptable here: a proposed window touches no accepted or needs-review detection
    of this round's model and no known PV label, so whatever the model saw as PV there was rejected by validation
    and an all-background mask agrees with every judgement made on it; the windows nearest to a confirmed false
    positive are exactly the confusers worth a background label. The residual risk — PV the model missed
    entirely — is bounded by ``max_mined_negatives`` per round, measured one round later
    (``mined_redetected_share``: the share of mined windows the next model detects PV in again) and reversible:
    every such row is findable by its mask source and round. Set ``add_mined_negatives = false`` to keep them as
    proposals only.
    """
    from aegir import pipelines
    from aegir.pipelines import tile_search

    cfg = context.config
    if not cfg.mine_hard_negatives:
        return {"skipped": "mine_hard_negatives = false"}
    detections, decisions, tiles = _validated(context)
    if "reject" not in decisions["decision"].to_pylist():
        return {"proposed": 0, "added": 0, "mean_distance": None}
    proposals = tile_search.mine_hard_negatives(
        context.settings, _encoder(context), detections, decisions, tiles, cfg.region_tiles, cfg.backfill_chip_px,
        cfg.mine_k, cfg.max_mined_negatives, cfg.max_hard_negatives, context.round_index)
    path = context.round_dir / "mined_negatives.parquet"
    pq.write_table(proposals, path)
    added = 0
    if cfg.add_mined_negatives and proposals.num_rows:
        chips = tile_search.window_chips(proposals, cfg.region_tiles)
        masks = {c.extras["sample_id"]: np.zeros((c.height, c.width), np.uint8) for c in chips}
        params = {"round": context.round_index, "model_checkpoint": context.earlier("train")["checkpoint"],
                  "backend_version": "embedding-nearest-window"}
        pipelines._write_training_batch(_table(context), chips, masks, {}, MINED_DATASET, "raw", "mined_negative",
                                        params)
        added = len(chips)
    distances = proposals["distance"].to_numpy()
    return {"proposed": proposals.num_rows, "added": added, "proposals": str(path),
            "mean_distance": float(distances.mean()) if len(distances) else None,
            "version": int(_table(context).version)}


def step_find_similar(context: RoundContext) -> dict:
    """Hook (b): the unlabelled tile windows nearest to the accepted detections (``round_<k>/similar_tiles.parquet``)
    and a boost for each grid-plan cell holding them; the next round's infer step plans those cells first."""
    from aegir.pipelines import tile_search

    cfg = context.config
    if not cfg.find_similar_tiles:
        return {"skipped": "find_similar_tiles = false"}
    detections, decisions, tiles = _validated(context)
    if "accept" not in decisions["decision"].to_pylist():
        return {"similar_windows": 0, "cells_reprioritised": 0, "boosts": {}}
    hits, boosts = tile_search.find_similar_tiles(
        context.settings, _encoder(context), detections, decisions, tiles, cfg.region_tiles, cfg.backfill_chip_px,
        cfg.similar_k, cfg.max_backfill, context.round_index)
    path = context.round_dir / "similar_tiles.parquet"
    pq.write_table(hits, path)
    return {"similar_windows": hits.num_rows, "cells_reprioritised": len(boosts), "boosts": boosts,
            "hits": str(path)}


def step_backfill(context: RoundContext) -> dict:
    """Accepted detections → chips + model-refined masks, rejected → hard negatives; one upsert each."""
    from aegir import pipelines
    from aegir.masks.base import get_backend

    detections, decisions, tiles = _validated(context)
    if not len(detections):
        return {"backfilled": 0, "hard_negatives": 0, "version": int(_table(context).version)}
    checkpoint = context.earlier("train")["checkpoint"]
    backend = get_backend("model", checkpoint=checkpoint)
    inputs = {"detections": detections, "validation_decisions": decisions, "detection_tiles": tiles,
              "backfill_chip_px": context.config.backfill_chip_px, "mask_backend": backend,
              "max_backfill": context.config.max_backfill, "max_hard_negatives": context.config.max_hard_negatives}
    result = pipelines.run_stage("backfill", ["accepted_chips", "refined_masks", "hard_negative_chips",
                                              "hard_negative_masks"], inputs)
    table = _table(context)
    params = {"round": context.round_index, "model_checkpoint": checkpoint, "backend_version": backend.version}
    written = {"backfilled": 0, "hard_negatives": 0}
    for key, chips, masks, source in (("backfilled", result["accepted_chips"], result["refined_masks"], "flywheel:model"),
                                      ("hard_negatives", result["hard_negative_chips"], result["hard_negative_masks"],
                                       "hard_negative")):
        if chips:
            pipelines._write_training_batch(table, chips, masks, {}, BACKFILL_DATASET, "raw", source, params)
            written[key] = len(chips)
    table = _table(context)
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


def _detection_tiles(detections, tiles_dir: Path) -> dict[str, Any]:
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


def _hook_effects(context: RoundContext) -> dict:
    """What the previous round's hooks did in this round: the share of its mined windows this round's model
    detects PV in again, and the share of its boosted cells holding an accepted detection (vs all cells)."""
    import shapely

    out = {"mined_redetected_share": None, "boosted_cell_hit_rate": None, "cell_hit_rate": None}
    detections = _detections(context)
    decisions = pq.read_table(context.earlier("validate")["decisions"])["decision"].to_pylist()
    accepted_cells = {c for c, d in zip(detections.get("cell_token", []), decisions) if d == "accept"}
    cells = context.earlier("infer").get("cells") or 0
    out["cell_hit_rate"] = len(accepted_cells) / cells if cells else None
    if context.round_index == 1:
        return out
    mined = (context.state.result(context.round_index - 1, "mine_negatives") or {}).get("proposals")
    if mined and Path(mined).is_file():
        windows = shapely.from_wkb(pq.read_table(mined, columns=["footprint_wkb"])["footprint_wkb"].to_pylist())
        if len(windows):
            tree = shapely.STRtree(list(detections.geometry))
            hit = {int(i) for i in tree.query(windows, predicate="intersects")[0]} if len(detections) else set()
            out["mined_redetected_share"] = len(hit) / len(windows)
    boosted = _previous_boosts(context)
    if boosted:
        out["boosted_cell_hit_rate"] = len(accepted_cells & set(boosted)) / len(boosted)
    return out


def _hook_columns(context: RoundContext) -> dict:
    """The per-round table's embedding-hook columns ("off" and None when a hook's step was skipped)."""
    embed = context.state.result(context.round_index, "embed_tiles") or {}
    mine = context.state.result(context.round_index, "mine_negatives") or {"skipped": "not run"}
    similar = context.state.result(context.round_index, "find_similar") or {"skipped": "not run"}
    ranks = context.earlier("infer").get("boosted_ranks") or {}
    return {"tile_windows": embed.get("windows"),
            "hard_negative_mining": "off" if "skipped" in mine else "on",
            "mined_proposed": mine.get("proposed"), "mined_added": mine.get("added"),
            "mined_mean_distance": mine.get("mean_distance"),
            "find_similar_tiles": "off" if "skipped" in similar else "on",
            "cells_reprioritised": similar.get("cells_reprioritised"),
            "boosted_cells_planned_first": (sorted(ranks.values()) == list(range(len(ranks)))) if ranks else None,
            **_hook_effects(context)}


def round_summary(context: RoundContext) -> dict:
    """One row of the per-round table."""
    dataset, train = context.earlier("dataset"), context.earlier("train")
    validate, backfill = context.earlier("validate"), context.earlier("backfill")
    return {"round": context.round_index, "rows": dataset["rows"], "data_version": dataset["version"],
            "masks_by_source": dataset["masks_by_source"], "val_iou": train.get("val_iou"),
            "held_out_pixel_iou": validate["held_out"]["pixel_iou"],
            "held_out_object_f1": validate["held_out"]["object"]["f1"],
            "detections": validate["detections"], "accepted": validate["accepted"], "rejected": validate["rejected"],
            "needs_review": validate["needs_review"], "backfilled": backfill["backfilled"],
            "hard_negatives": backfill["hard_negatives"], "version_after_backfill": backfill["version"],
            **_hook_columns(context)}

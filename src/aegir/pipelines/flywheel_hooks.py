"""The embedding-hook steps of a flywheel round (issue #8; see :mod:`aegir.pipelines.flywheel`): embed the region's
tile windows, mine hard negatives near rejected detections, find unlabelled tiles like the accepted ones; and the
per-round table's hook columns (what the previous round's hooks did in this one).

The jobs are :mod:`aegir.pipelines.embeddings`; each step returns a JSON-able result dict.
"""

from __future__ import annotations

import numpy as np

from aegir.pipelines.flywheel_steps import (
    MINED_DATASET,
    RoundContext,
    previous_boosts,
    round_decisions,
    round_detections,
    training_table,
    validated,
)
from aegir.store import run_files


def _encoder(context: RoundContext):
    from aegir.training.embedder import encoder_from_checkpoint

    return encoder_from_checkpoint(context.earlier("train")["checkpoint"], "cpu")


def step_embed_tiles(context: RoundContext) -> dict:
    """Every ``backfill_chip_px``² window of the region tiles embedded with this round's encoder (idempotent: a
    resumed step embeds only the windows still missing); skipped when both embedding hooks are off."""
    from aegir.pipelines import embeddings

    cfg = context.config
    if not (cfg.mine_hard_negatives or cfg.find_similar_tiles):
        return {"skipped": "mine_hard_negatives and find_similar_tiles are false"}
    report = embeddings.embed_region_tiles(context.settings, _encoder(context), cfg.region_tiles, cfg.plan_level,
                                           cfg.backfill_chip_px)
    return {"model": report.model, "region": report.region, "windows": report.windows,
            "embedded": report.embedded, "skipped_existing": report.skipped_existing, "cells": report.cells,
            "version": report.version}


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
    from aegir.pipelines import embeddings
    from aegir.pipelines.dataset import write_training_batch

    cfg = context.config
    if not cfg.mine_hard_negatives:
        return {"skipped": "mine_hard_negatives = false"}
    detections, decisions, tiles = validated(context)
    if "reject" not in decisions["decision"].to_pylist():
        return {"proposed": 0, "added": 0, "mean_distance": None}
    proposals = embeddings.mine_hard_negatives(
        context.settings, _encoder(context), detections, decisions, tiles, cfg.region_tiles, cfg.backfill_chip_px,
        cfg.mine_k, cfg.max_mined_negatives, cfg.max_hard_negatives, context.round_index)
    path = run_files.write_parquet(proposals, context.round_dir / "mined_negatives.parquet")
    added = 0
    if cfg.add_mined_negatives and proposals.num_rows:
        chips = embeddings.window_chips(proposals, cfg.region_tiles)
        masks = {c.extras["sample_id"]: np.zeros((c.height, c.width), np.uint8) for c in chips}
        params = {"round": context.round_index, "model_checkpoint": context.earlier("train")["checkpoint"],
                  "backend_version": "embedding-nearest-window"}
        write_training_batch(training_table(context), chips, masks, {}, MINED_DATASET, "raw", "mined_negative", params)
        added = len(chips)
    distances = proposals["distance"].to_numpy()
    return {"proposed": proposals.num_rows, "added": added, "proposals": str(path),
            "mean_distance": float(distances.mean()) if len(distances) else None,
            "version": int(training_table(context).version)}


def step_find_similar(context: RoundContext) -> dict:
    """Hook (b): the unlabelled tile windows nearest to the accepted detections (``round_<k>/similar_tiles.parquet``)
    and a boost for each grid-plan cell holding them; the next round's infer step plans those cells first."""
    from aegir.pipelines import embeddings

    cfg = context.config
    if not cfg.find_similar_tiles:
        return {"skipped": "find_similar_tiles = false"}
    detections, decisions, tiles = validated(context)
    if "accept" not in decisions["decision"].to_pylist():
        return {"similar_windows": 0, "cells_reprioritised": 0, "boosts": {}}
    hits, boosts = embeddings.find_similar_tiles(
        context.settings, _encoder(context), detections, decisions, tiles, cfg.region_tiles, cfg.backfill_chip_px,
        cfg.similar_k, cfg.max_backfill, context.round_index)
    path = run_files.write_parquet(hits, context.round_dir / "similar_tiles.parquet")
    return {"similar_windows": hits.num_rows, "cells_reprioritised": len(boosts), "boosts": boosts,
            "hits": str(path)}


def _mined_redetected_share(context: RoundContext, detections) -> float | None:
    """The share of the previous round's mined windows that hold one of this round's detections (None: none)."""
    import shapely

    mined = (context.state.result(context.round_index - 1, "mine_negatives") or {}).get("proposals")
    table = run_files.read_parquet(mined, columns=["footprint_wkb"], missing_ok=True) if mined else None
    if table is None:
        return None
    windows = shapely.from_wkb(table["footprint_wkb"].to_pylist())
    if not len(windows):
        return None
    tree = shapely.STRtree(list(detections.geometry))
    hit = {int(i) for i in tree.query(windows, predicate="intersects")[0]} if len(detections) else set()
    return len(hit) / len(windows)


def _hook_effects(context: RoundContext) -> dict:
    """What the previous round's hooks did in this round: the share of its mined windows this round's model
    detects PV in again, and the share of its boosted cells holding an accepted detection (vs all cells)."""
    out = {"mined_redetected_share": None, "boosted_cell_hit_rate": None, "cell_hit_rate": None}
    detections = round_detections(context)
    decisions = round_decisions(context)["decision"].to_pylist()
    accepted_cells = {c for c, d in zip(detections.get("cell_token", []), decisions) if d == "accept"}
    cells = context.earlier("infer").get("cells") or 0
    out["cell_hit_rate"] = len(accepted_cells) / cells if cells else None
    if context.round_index == 1:
        return out
    out["mined_redetected_share"] = _mined_redetected_share(context, detections)
    boosted = previous_boosts(context)
    if boosted:
        out["boosted_cell_hit_rate"] = len(accepted_cells & set(boosted)) / len(boosted)
    return out


def hook_columns(context: RoundContext) -> dict:
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

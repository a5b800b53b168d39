"""The steps of one flywheel round (see :mod:`aegir.pipelines.flywheel`): each takes the :class:`RoundContext`
and returns a JSON-able result dict.

* **data** — round 0: the hold-out partition (``OUT/partition.json``) and the labelled seed rows; round k: the
  pseudo-label windows round k − 1 admitted, capped relative to the seed, as rows of ``flywheel_pseudo_r<k>``.
* **train** — a fixed budget on the pinned version: the seed + this round's pseudo-labels, warm-started from round
  k − 1's checkpoint; pseudo-label rows always train. The round's model is promoted only when its monitored
  validation score (the seed's validation cells) is no worse than the previous round's; else the previous model
  carries on.
* **evaluate** — the round's model on the seed test part, the target truth and the transfer boxes.
* **detect** — in :mod:`aegir.pipelines.flywheel_detect`.

Everything a step reads or writes goes through the store layer (:mod:`aegir.store.lance_io`,
:mod:`aegir.store.run_files`, :mod:`aegir.store.mask_files`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aegir.config import Settings
from aegir.store import image_files, run_files

SEED_DATASET = "flywheel_seed"
PSEUDO_SOURCE, NEGATIVE_SOURCE = "flywheel:pseudo", "flywheel:negative"
PARTS = ("labelled", "val", "target", "test")


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
        return f"{self.settings.lancedb_root.rstrip('/')}/training_data"  # a local folder or s3://…

    def earlier(self, step: str, round_index: int | None = None) -> dict:
        index = self.round_index if round_index is None else round_index
        result = self.state.result(index, step)
        if result is None:
            raise RuntimeError(f"flywheel round {index}: step {step!r} has no recorded result")
        return result


def pseudo_dataset(round_index: int) -> str:
    return f"flywheel_pseudo_r{round_index}"


def training_table(context: RoundContext):
    """The run's ``training_data`` table (LanceDB), created when missing."""
    from aegir.store import lance_io

    settings = context.settings
    return lance_io.open_training_table(context.table_uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                        h3_resolution=settings.h3_resolution)


# ---- the hold-out partition and the image lists -------------------------------------------------------------


def partition(context: RoundContext) -> dict[str, list[str]]:
    """``OUT/partition.json``: the seed images by part (labelled / val / target / test), whole S2 cells at
    ``holdout_level`` per part, and ``val_cells`` (the val part's cells); written in round 0, read afterwards.

    The val part (``val_fraction`` of the labelled share) is labelled and trains nothing: it picks each round's
    best epoch and decides promotion, the same cells every round."""
    from aegir.dataflows.holdout import holdout_parts
    from aegir.store import mask_files
    from aegir.utils import geo, s2geometry

    path = context.out / "partition.json"
    if run_files.is_file(path):
        return {"val": [], "val_cells": []} | run_files.read_json(path)
    cfg = context.config
    images = image_files.list_image_files(cfg.seed_images) if cfg.seed_images else []
    shares = {"target": cfg.holdout_target_share, "test": cfg.holdout_test_share}
    parts: dict[str, list[str]] = {part: [] for part in PARTS} | {"labelled": [str(p) for p in images]}
    if images and any(shares.values()):
        from aegir.training.config import TrainConfig

        shares["val"] = float(cfg.train.get("val_fraction", TrainConfig.val_fraction)) * (1 - sum(shares.values()))
        centres = np.array([geo.chip_centre_lonlat(mask_files.read_image_chip(p)) for p in images])
        names = holdout_parts(centres, cfg.holdout_level, shares, str(cfg.seed))
        parts = {part: [str(p) for p, n in zip(images, names) if n == part] for part in PARTS}
        val = np.array([n == "val" for n in names], dtype=bool)
        parts["val_cells"] = sorted(set(s2geometry.s2_tokens(centres[val, 1], centres[val, 0],
                                                             cfg.holdout_level).tolist()))
    run_files.write_json(parts, path, atomic=True)
    return {"val_cells": []} | parts


def target_image_paths(context: RoundContext) -> list[Path]:
    """The held-out target part of the seed, then every ``target_images`` entry (files, folders, globs,
    ``catalog:<dataset>``)."""
    from aegir.pipelines.imagery import list_imagery

    parts = partition(context)
    paths = [Path(p) for p in parts["target"]]
    held = {Path(p).resolve(): part for part in ("labelled", "val", "test") for p in parts[part]}
    for entry in context.config.target_images:
        if entry.startswith("catalog:"):
            rows = list_imagery(context.settings, entry.removeprefix("catalog:"))
            if rows.num_rows == 0:
                raise ValueError(f"target_images {entry!r}: the imagery catalog has no such dataset")
            paths += [Path(u) for u in rows["uri"].to_pylist() if "#" not in u]
        else:
            paths += image_files.resolve_image_entries([entry], "target_images")
    clash = [(p, held[p.resolve()]) for p in paths if p.resolve() in held]
    if clash:
        raise ValueError(f"target_images holds {len(clash)} image(s) of the seed's labelled / val / test parts "
                         f"(e.g. {clash[0][0]} in {clash[0][1]}): the loop must not pseudo-label imagery it trains, "
                         "validates or is scored on")
    return paths


def target_truth(context: RoundContext) -> dict[str, Path]:
    """stem → truth mask of the target images that have one (the hold-out target's seed masks, ``target_truth``)."""
    cfg = context.config
    truth = {}
    if partition(context)["target"]:
        seed_masks = image_files.mask_files_by_stem(cfg.seed_masks)
        truth |= {Path(p).stem: seed_masks[Path(p).stem] for p in partition(context)["target"]
                  if Path(p).stem in seed_masks}
    if cfg.target_truth:
        truth |= image_files.mask_files_by_stem(cfg.target_truth)
    return truth


# ---- data ---------------------------------------------------------------------------------------------------


def step_data(context: RoundContext) -> dict:
    """Round 0: the labelled seed rows; round k: round k − 1's admitted windows (capped). Pins the version."""
    from aegir.store import lance_io

    if context.round_index == 0:
        added = _seed_rows(context)
    else:
        added = _pseudo_rows(context)
    table = training_table(context)
    version = int(table.version)
    meta = lance_io.read_version(table, version, {"dataset": "metadata.dataset", "source": "metadata.mask_source"})
    datasets = Counter(meta["dataset"].to_pylist())
    seed_datasets = added.get("seed_datasets") or context.earlier("data", 0)["seed_datasets"]
    return added | {"version": version, "seed_rows": sum(datasets.get(d, 0) for d in seed_datasets),
                    "rows_by_dataset": dict(datasets)}


def _seed_rows(context: RoundContext) -> dict:
    from aegir.pipelines.dataset import build_dataset_from_images

    cfg = context.config
    parts = partition(context)
    if cfg.seed_uri:
        from aegir.store import lance_io

        copied = lance_io.copy_masked_rows(cfg.seed_uri, context.settings.lancedb_root, training_table(context))
        return {"seed_uri": cfg.seed_uri, "seed_datasets": sorted(copied), "seed_rows_copied": copied,
                "parts": {k: len(parts[k]) for k in PARTS}}
    report = build_dataset_from_images(context.settings, cfg.seed_images, cfg.seed_masks, context.table_uri,
                                       SEED_DATASET, image_paths=[Path(p) for p in parts["labelled"] + parts["val"]])
    return {"seed_datasets": [SEED_DATASET], "seed_rows_inserted": report.inserted, "skipped": report.skipped,
            "parts": {k: len(parts[k]) for k in PARTS}}


def _caps(context: RoundContext) -> tuple[int, int]:
    seed_rows = context.earlier("data", 0)["seed_rows"]
    cfg = context.config
    return math.ceil(cfg.max_positive_share * seed_rows), math.ceil(cfg.max_negative_share * seed_rows)


def _pseudo_rows(context: RoundContext) -> dict:
    """Round k − 1's admitted windows → rows of ``flywheel_pseudo_r<k>`` (positives by confidence, negatives by
    emptiness, each up to its cap), per-row confidence and evidence in the provenance."""
    from aegir.pipelines.dataset import write_training_batch
    from aegir.store import mask_files
    from aegir.store.lance_io import MASK_IGNORE
    from aegir.utils import geo

    previous = context.earlier("detect", context.round_index - 1)
    windows = run_files.read_json(previous["windows"])
    masks = run_files.read_npz(previous["masks"])
    cap_positive, cap_negative = _caps(context)
    chosen = {kind: sorted((w for w in windows if w["kind"] == kind), key=lambda w: -w["confidence"])[:cap]
              for kind, cap in (("positive", cap_positive), ("negative", cap_negative))}
    table = training_table(context)
    checkpoint = context.earlier("train", context.round_index - 1)["checkpoint"]
    written = {}
    for kind, source in (("positive", PSEUDO_SOURCE), ("negative", NEGATIVE_SOURCE)):
        chips, window_masks, ignored = [], {}, {}
        by_image: dict[str, list[dict]] = {}
        for window in chosen[kind]:
            by_image.setdefault(window["image"], []).append(window)
        for image, items in by_image.items():
            tile = mask_files.read_image_chip(image)
            for window in items:
                chip = geo.chip_window(tile, window["col"], window["row"], window["size"])
                sample_id = f"{Path(image).stem}_c{window['col']}_r{window['row']}"
                chip = geo.with_sample(chip, sample_id, provenance={
                    "confidence": window["confidence"], "components": window["components"],
                    "evidence": window["evidence"], "made_by_round": context.round_index - 1})
                chips.append(chip)
                window_masks[sample_id] = masks[window["key"]] == 1
                ignored[sample_id] = masks[window["key"]] == MASK_IGNORE
        if chips:
            write_training_batch(table, chips, window_masks, {}, pseudo_dataset(context.round_index), "raw", source,
                                 {"round": context.round_index, "model_checkpoint": checkpoint, "backend": "model",
                                  "backend_version": f"round_{context.round_index - 1}"}, ignore=ignored)
        written[kind] = len(chips)
    return {"pseudo_positive": written["positive"], "pseudo_negative": written["negative"],
            "admitted_positive": sum(w["kind"] == "positive" for w in windows),
            "admitted_negative": sum(w["kind"] == "negative" for w in windows),
            "cap_positive": cap_positive, "cap_negative": cap_negative}


# ---- train --------------------------------------------------------------------------------------------------


def round_train_config(context: RoundContext):
    """The round's TrainConfig: the configured budget, the pinned version, the seed + this round's pseudo rows,
    the previous checkpoint as the start (its learning rate × ``warm_start_lr_scale``), the val part's cells as
    validation, no test cells when the seed has a test part."""
    from aegir.training.config import TrainConfig

    cfg = context.config
    k = context.round_index
    datasets = context.earlier("data", 0)["seed_datasets"] + ([pseudo_dataset(k)] if k else [])
    init = context.earlier("train", k - 1)["checkpoint"] if k and cfg.warm_start else None
    train = dict(cfg.train)
    if init:  # fine-tuning a trained model: a smaller step than training from scratch
        train["lr"] = train.get("lr", TrainConfig.lr) * cfg.warm_start_lr_scale
    values = {"wandb": False, "progress_bar": False, "accelerator": "cpu", "seed": cfg.seed} | train | {
        "dataset_version": context.earlier("data")["version"], "filter_dataset": datasets,
        "train_only_datasets": [pseudo_dataset(k)] if k else [], "init_checkpoint": init}
    parts = partition(context)
    if parts["test"]:
        values["test_fraction"] = 0.0
    if parts["val_cells"]:  # the val part's cells; the split lists its cells at the same level
        values |= {"val_cells": parts["val_cells"], "split_level": cfg.holdout_level}
    return TrainConfig.from_dict(values)


def step_train(context: RoundContext) -> dict:
    """Fit the round's model (``round_<k>/train/best.ckpt``, the epoch best on ``monitor``). A challenger whose
    monitored validation score (the seed's validation cells: the same in every round) is worse than the previous
    round's model keeps that model instead (``promoted`` false): a round never hands on a model its own
    validation says is worse."""
    from aegir.store import training_files
    from aegir.training.litmodule import monitor_sign
    from aegir.training.train import run_training

    config = round_train_config(context)
    result = run_training(context.table_uri, config, context.round_dir / "train", context.settings.lancedb_root)
    score = result.best_metrics.get(config.monitor)
    previous = context.earlier("train", context.round_index - 1) if context.round_index else None
    promoted = (previous is None or previous.get("val_score") is None or score is None
                or monitor_sign(config.monitor) * (score - previous["val_score"]) >= 0)
    if not promoted:
        payload = training_files.read_checkpoint(previous["checkpoint"])
        training_files.write_checkpoint(payload, result.best_checkpoint)
    kept = result.best_metrics if promoted else previous["val_metrics"]
    return {"checkpoint": result.best_checkpoint, "data_version": result.data_version,
            "split_counts": result.split_counts, "epochs": result.epochs, "warm_start": config.init_checkpoint,
            "monitor": config.monitor, "challenger_val_score": score, "promoted": promoted,
            "val_score": score if promoted else previous["val_score"], "val_iou": kept.get("val/iou"),
            "val_metrics": {k: v for k, v in kept.items() if k.startswith("val/")},
            "fit_seconds": round(result.seconds, 1)}


# ---- evaluate -----------------------------------------------------------------------------------------------


def _seed_test(context: RoundContext) -> tuple[list[Path], dict[str, Path]]:
    """The seed-test images and their masks: the hold-out test part, else the training split's test rows."""
    cfg = context.config
    masks = image_files.mask_files_by_stem(cfg.seed_masks) if cfg.seed_masks else {}
    test = [Path(p) for p in partition(context)["test"]]
    if not test and cfg.seed_images:
        train = context.earlier("train")
        split = run_files.read_json(Path(train["checkpoint"]).parent / "split.json")
        stems = set(_stems_of(context, train["data_version"], split["uuids"]["test"]))
        test = [p for p in image_files.list_image_files(cfg.seed_images) if p.stem in stems]
    return test, masks


def _stems_of(context: RoundContext, version: int, uuids: list[str]) -> list[str]:
    from aegir.store import lance_io

    rows = lance_io.read_version(training_table(context), version, {"uuid": "uuid", "sample_id": "metadata.sample_id"})
    wanted = set(uuids)
    return [r["sample_id"] for r in rows.to_pylist() if r["uuid"] in wanted]


def step_evaluate(context: RoundContext) -> dict:
    """Seed-test and target-truth pixel IoU + object P/R/F1, transfer box recall / precision / F1."""
    from aegir.pipelines.predict import load_rgb_model, scored_images, transfer_box_scores

    cfg = context.config
    model = load_rgb_model(context.earlier("train")["checkpoint"], "cpu")
    test, test_masks = _seed_test(context)
    result: dict[str, Any] = {"seed_test": scored_images(model, test, test_masks)}
    truth = target_truth(context)
    targets = [p for p in target_image_paths(context) if p.stem in truth]
    result["target"] = scored_images(model, targets, truth) if targets else None
    if cfg.transfer_images and cfg.transfer_boxes:
        scores = transfer_box_scores(model, cfg.transfer_images, cfg.transfer_boxes)
        result["transfer"] = {k: v for k, v in scores.items() if k != "per_image"}
    return result


# ---- the per-round table ------------------------------------------------------------------------------------


def _metric(block: dict | None, *keys: str) -> float | None:
    for key in keys:
        if block is None:
            return None
        block = block.get(key)
    return None if block is None else round(float(block), 4)


def round_summary(context: RoundContext) -> dict:
    """One row of the per-round table (every step of the round recorded)."""
    data, train = context.earlier("data"), context.earlier("train")
    evaluation, detect = context.earlier("evaluate"), context.earlier("detect")
    changes = detect.get("changes") or {}
    return {"round": context.round_index, "rows": sum(data["rows_by_dataset"].values()),
            "pseudo_positive": data.get("pseudo_positive", 0), "pseudo_negative": data.get("pseudo_negative", 0),
            "epochs": train["epochs"], "val_iou": _metric(train, "val_iou"), "promoted": train.get("promoted", True),
            "seed_test_iou": _metric(evaluation, "seed_test", "pixel_iou"),
            "seed_test_object_f1": _metric(evaluation, "seed_test", "object", "f1"),
            "target_iou": _metric(evaluation, "target", "pixel_iou"),
            "target_object_precision": _metric(evaluation, "target", "object", "precision"),
            "target_object_recall": _metric(evaluation, "target", "object", "recall"),
            "target_object_f1": _metric(evaluation, "target", "object", "f1"),
            "transfer_recall": _metric(evaluation, "transfer", "recall"),
            "transfer_precision": _metric(evaluation, "transfer", "precision"),
            "transfer_f1": _metric(evaluation, "transfer", "f1"),
            "detections": detect["detections"], "accepted": detect["accepted"],
            "accepted_precision": _metric(detect, "accepted_precision"),
            "region_candidates": changes.get("region_candidates"),
            "accepted_share": _metric(changes, "accepted_share"), "kept": changes.get("kept"),
            "added": changes.get("added"), "dropped": changes.get("dropped"),
            "admitted_positive": detect["admitted_positive"], "admitted_negative": detect["admitted_negative"],
            "data_version": data["version"]}


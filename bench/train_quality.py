"""Training quality on the 60 shared Jiang PV01 pairs: CPU, spatially disjoint splits, IoU on unseen tiles.

Builds ``training_data`` from the tiles and their ground-truth masks (a temporary LanceDB root), trains the
default recipe (:class:`aegir.training.config.TrainConfig`: U-Net / ResNet-18, random init, Dice + BCE, dihedral
augmentation) under a wall-clock cap, then scores ``best.ckpt`` with ``aegir evaluate``'s code on the
validation split (the cells that chose the checkpoint) and on the test split (cells never seen in training or
model selection). Prints one JSON object and a table next to Jiang et al. (2021).

    python bench/train_quality.py [--max-minutes 18] [--max-epochs 80] [--threads 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aegir.config import Settings  # noqa: E402
from aegir.pipelines.dataset import build_dataset_from_images  # noqa: E402
from aegir.pipelines.predict import object_and_pixel_scores  # noqa: E402
from aegir.store.training_files import read_checkpoint  # noqa: E402
from aegir.training.config import TrainConfig  # noqa: E402
from aegir.training.train import run_training  # noqa: E402

JIANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "vhr" / "jiang_pv01"
# Jiang et al. (2021), ESSD 13, 5389, doi:10.5194/essd-13-5389-2021: "on average an IoU greater than 85 %" over
# their deep networks and resolutions (trained on all 3,716 samples, ImageNet-pretrained encoders).
PAPER_IOU = 0.85


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-minutes", type=float, default=18.0)
    parser.add_argument("--max-epochs", type=int, default=80)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="keep the run folder here (default: temporary)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="aegir-train-quality-"))
    out = args.out or work / "run"
    settings = Settings(lancedb_root=str(work / "lancedb"))
    uri = str(work / "lancedb" / "training_data")
    report = build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", uri, "jiang_pv01")
    config = TrainConfig(max_epochs=args.max_epochs, max_minutes=args.max_minutes, threads=args.threads,
                         accelerator=args.accelerator, wandb=False, progress_bar=False)
    started = time.perf_counter()
    result = run_training(uri, config, out, str(settings.lancedb_root))
    train_seconds = time.perf_counter() - started

    split = read_checkpoint(result.best_checkpoint)["split"] or {}
    split_uuids = json.loads((out / "split.json").read_text())["uuids"]
    stems = _stems_by_uuid(uri, settings)
    scores = {}
    for name in ("val", "test"):
        chosen = [stems[u] for u in split_uuids[name]]
        metrics = object_and_pixel_scores(result.best_checkpoint, JIANG / "images", JIANG / "masks", chosen,
                                          device="cpu")
        scores[name] = {k: metrics[k] for k in ("mean_iou", "pixel_iou", "f1", "precision", "recall", "images")}
        scores[name]["object_iou50"] = metrics["object"]
    summary = {
        "rows": report.inserted + report.updated, "split_counts": result.split_counts,
        "split_level": split.get("level"), "epochs": result.epochs, "train_seconds": round(train_seconds, 1),
        "threads": args.threads, "best_epoch_metrics": {k: round(v, 4) for k, v in result.best_metrics.items()},
        "val": scores["val"], "test_unseen": scores["test"], "paper_iou": PAPER_IOU,
        "val_iou_over_goal": round(scores["val"]["pixel_iou"] / 0.85, 3), "checkpoint": result.best_checkpoint,
    }
    print(json.dumps(summary, indent=1))
    print(f"\n{'':28}{'pixel IoU':>10}{'mean IoU':>10}{'F1':>8}{'object F1@.5':>14}")
    for name in ("val", "test"):
        s = scores[name]
        label = f"this repo, {name} ({s['images']} tiles)"
        print(f"{label:28}{s['pixel_iou']:>10.3f}{s['mean_iou']:>10.3f}{s['f1']:>8.3f}"
              f"{s['object_iou50']['f1']:>14.3f}")
    print(f"{'Jiang et al. 2021 (avg)':28}{PAPER_IOU:>10.3f}{'':>10}{'':>8}")
    print(f"trained {result.epochs} epochs in {train_seconds / 60:.1f} min on {args.threads} threads")


def _stems_by_uuid(uri: str, settings: Settings) -> dict[str, str]:
    from aegir.store import lance_io

    table = lance_io.open_training_table(uri, str(settings.lancedb_root), create=False)
    rows = table.to_lance().to_table(columns={"uuid": "uuid", "source": "metadata.source_file"}).to_pylist()
    return {row["uuid"]: Path(row["source"]).stem for row in rows}


if __name__ == "__main__":
    main()

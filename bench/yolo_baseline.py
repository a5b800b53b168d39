"""YOLO-seg baseline on the 60 shared Jiang PV01 pairs: the SMP recipe's spatial split, mask mAP and pixel IoU.

Builds ``training_data`` from the tiles and their ground-truth masks (a temporary LanceDB root), exports it to the
Ultralytics layout with the default :class:`~aegir.training.config.TrainConfig` split (the 40 / 10 / 10 tiles
``bench/train_quality.py`` trains the SMP model on), checks the export with Ultralytics, trains YOLO-seg from its
YAML (random init, offline) and reports, on val and test: mask mAP50 / mAP50-95 (Ultralytics' validator), and
the pixel IoU / mean IoU of the union of predicted instance masks against the stored masks — the numbers
``bench/train_quality.py`` prints for the SMP model (pass its JSON with ``--smp-json`` to see them side by side).

Needs the ``yolo`` extra and ultralytics (``pip install -e '.[yolo]' && pip install --no-deps ultralytics``).

    python bench/yolo_baseline.py [--epochs 3] [--imgsz 256] [--batch 8] [--device cpu] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aegir.config import Settings  # noqa: E402
from aegir.pipelines.dataset import build_dataset_from_images  # noqa: E402
from aegir.store import lance_io  # noqa: E402
from aegir.store.chip_codec import decode_chip  # noqa: E402
from aegir.training.config import TrainConfig  # noqa: E402
from aegir.training.yolo_baseline import (  # noqa: E402
    check_yolo_dataset, export_yolo_dataset, import_ultralytics, train_yolo_baseline)
from aegir.utils.mask_metrics import mask_set_metrics  # noqa: E402

JIANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "vhr" / "jiang_pv01"


def stored_masks(uri: str, lancedb_root: str) -> dict[str, np.ndarray]:
    """uuid → (H, W) bool mask as stored in the table (the truth both baselines are scored against)."""
    table = lance_io.open_training_table(uri, lancedb_root, create=False)
    rows = table.to_lance().to_table(columns=["uuid", "generated_mask", "metadata"]).to_pylist()
    return {r["uuid"]: decode_chip(r["generated_mask"], r["metadata"]["mask_encoding"], r["metadata"]["mask_shape"],
                                   "uint8") > 0 for r in rows}


def pixel_scores(weights: str, images: Path, truth: dict[str, np.ndarray], imgsz: int, conf: float,
                 device: str) -> dict:
    """IoU metrics of the union of predicted instance masks (full resolution) per image of a split folder."""
    model = import_ultralytics().YOLO(weights, task="segment")
    pairs = []
    for path in sorted(images.glob("*.png")):
        result = model.predict(str(path), imgsz=imgsz, conf=conf, retina_masks=True, device=device, verbose=False)[0]
        mask = truth[path.stem]
        pred = np.zeros_like(mask)
        if result.masks is not None:
            pred = (result.masks.data.cpu().numpy() > 0.5).any(axis=0)[: mask.shape[0], : mask.shape[1]]
        pairs.append((path.stem, pred, mask))
    metrics = mask_set_metrics(pairs)
    return {k: metrics[k] for k in ("pixel_iou", "mean_iou", "f1", "precision", "recall", "images")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--imgsz", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--model", default="yolo11n-seg.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conf", type=float, default=0.25, help="confidence for the pixel-IoU predictions")
    parser.add_argument("--out", type=Path, default=None, help="keep the export and runs here (default: temporary)")
    parser.add_argument("--smp-json", type=Path, default=None, help="JSON printed by bench/train_quality.py")
    args = parser.parse_args()

    work = args.out or Path(tempfile.mkdtemp(prefix="aegir-yolo-baseline-"))
    settings = Settings(lancedb_root=str(work / "lancedb"))
    uri = str(work / "lancedb" / "training_data")
    build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", uri, "jiang_pv01")
    export = export_yolo_dataset(uri, work / "yolo", TrainConfig(), settings.lancedb_root, overwrite=True)
    check = check_yolo_dataset(export["data_yaml"], imgsz=args.imgsz)
    run = train_yolo_baseline(export["data_yaml"], work / "runs", model=args.model, epochs=args.epochs,
                              imgsz=args.imgsz, device=args.device, batch=args.batch)
    truth = stored_masks(uri, settings.lancedb_root)
    pixels = {s: pixel_scores(run["weights"], work / "yolo" / "images" / s, truth, args.imgsz, args.conf, args.device)
              for s in ("val", "test")}
    summary = {"split_counts": export["counts"], "objects": export["objects"],
               "dropped_polygons": export["dropped_polygons"], "ultralytics_check_ok": check["ok"],
               "model": args.model, "epochs": args.epochs, "imgsz": args.imgsz, "train_seconds": run["seconds"],
               "mask_map": run["metrics"], "pixel": pixels, "weights": run["weights"]}
    print(json.dumps(summary, indent=1))
    smp = json.loads(args.smp_json.read_text()) if args.smp_json else {}
    print(f"\n{'':24}{'mask mAP50':>11}{'mAP50-95':>10}{'pixel IoU':>10}{'mean IoU':>10}")
    for name in ("val", "test"):
        m, p = run["metrics"][name], pixels[name]
        print(f"{'YOLO-seg, ' + name:24}{m['mask_map50']:>11.3f}{m['mask_map50_95']:>10.3f}"
              f"{p['pixel_iou']:>10.3f}{p['mean_iou']:>10.3f}")
        s = smp.get({"val": "val", "test": "test_unseen"}[name])
        if s:
            print(f"{'SMP (train_quality), ' + name:24}{'':>11}{'':>10}{s['pixel_iou']:>10.3f}{s['mean_iou']:>10.3f}")
    print(f"YOLO trained {args.epochs} epochs in {run['seconds'] / 60:.1f} min ({args.device}, imgsz {args.imgsz})")


if __name__ == "__main__":
    main()

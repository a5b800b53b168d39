"""Mask Factory quality: mean IoU per backend on the Jiang PV01 tiles, boxes from ground-truth components.

Prompts: one box per 8-connected component of each ground-truth mask (PV where > 0), written as a CSV in the
``aegir masks generate`` layout and run through the same pipeline as the CLI, then scored with
``aegir masks evaluate``'s function. The offline backend was tuned on the tiles not held out; every 4th tile
(sorted by name, index % 4 == 0) is held out and reported separately. The one tile whose mask is empty gets no
prompts; it is excluded from the means (an empty prediction on it would score 1.0 and flatter the mean).
A ``box`` row (the union of the prompt boxes as the mask) is the trivial baseline.
Backends whose weights are not on this machine are reported as unavailable with the reason.
Then the offline backend runs on the NREL sample tiles with their real box annotations, and quicklook PNGs (image |
prompts | mask overlay) go to ``--quicklooks`` (default ./data/quicklooks/nrel).

Then (alone with ``--jitter-only``) the offline backend's robustness to imperfect prompts, in-process: mean IoU vs
box-edge jitter 0..5 px (each edge moved by a uniform random integer in -j..j, fixed seed), boxes whose far edges
sit 1 / 2 px inside the array, one point per array (its centroid if inside it, else its deepest pixel), and the
array's own mask as a polygon prior with a jitter-3 box; goals: jitter-3 loss <= 0.03, points >= 0.75.

    python bench/mask_quality.py [--shared ../shared/data] [--backends offline,sam,sam-hq,sam2,model]
    python bench/mask_quality.py --jitter-only
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aegir.masks.base import MaskBackendError
from aegir.pipelines.masks import evaluate_masks, generate_masks
from aegir.store.image_files import list_image_files, read_mask
from aegir.store.mask_files import write_component_box_prompts

HERE = Path(__file__).resolve().parent


def box_baseline(prompts_csv: Path, out: Path, jiang: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    boxes: dict[str, list] = {}
    with prompts_csv.open() as handle:
        for row in csv.DictReader(handle):
            boxes.setdefault(row["filename"], []).append([int(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")])
    for image in list_image_files(jiang / "images"):
        mask = np.zeros(read_mask(jiang / "masks" / image.name).shape, np.uint8)
        for x0, y0, x1, y1 in boxes.get(image.name, []):
            mask[y0:y1, x0:x1] = 255
        Image.fromarray(mask).save(out / f"{image.stem}.png")


def summarise(result: dict, stems: list[str], nonempty: set[str]) -> dict:
    held = {s for i, s in enumerate(stems) if i % 4 == 0}
    def mean(keys):
        vals = [result["per_image"][k]["iou"] for k in keys if k in result["per_image"]]
        return round(float(np.mean(vals)), 4) if vals else None
    tuned = [s for s in stems if s in nonempty and s not in held]
    heldout = [s for s in stems if s in nonempty and s in held]
    return {"mean_iou_all": mean([s for s in stems if s in nonempty]), "mean_iou_tuning": mean(tuned),
            "mean_iou_heldout": mean(heldout), "tiles_tuning": len(tuned), "tiles_heldout": len(heldout),
            "pixel_iou": round(result["pixel_iou"], 4)}


def unseen_stems(checkpoint: str, stems: list[str]) -> set[str]:
    """Jiang tiles whose S2 cell (at the checkpoint's split level) was not in its train split."""
    from aegir.store.training_files import read_checkpoint
    from aegir.utils import geo, s2geometry

    split = read_checkpoint(checkpoint)["split"]
    train_cells = set(split["cells"]["train"])
    centres = [geo.parse_tile_name(stem) for stem in stems]
    tokens = s2geometry.s2_tokens([c.lat for c in centres], [c.lon for c in centres], split["level"])
    return {stem for stem, token in zip(stems, tokens) if token not in train_cells}


def mean_iou_of(pred: Path, jiang: Path, keep: set[str]) -> float | None:
    result = evaluate_masks(pred, jiang / "masks")
    values = [v["iou"] for k, v in result["per_image"].items() if k in keep]
    return round(float(np.mean(values)), 4) if values else None


def quicklooks(images: Path, annotations: Path, out: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    boxes: dict[str, list] = {}
    with annotations.open() as handle:
        for row in csv.DictReader(handle):
            boxes.setdefault(Path(row["filename"]).stem, []).append([float(row[k]) for k in ("xmin", "ymin", "xmax",
                                                                                              "ymax")])
    written = []
    for image_path in list_image_files(images):
        if image_path.stem not in boxes:
            continue
        rgb = Image.open(image_path).convert("RGB")
        prompts = rgb.copy()
        draw = ImageDraw.Draw(prompts)
        for box in boxes[image_path.stem]:
            draw.rectangle(box, outline=(255, 255, 0), width=2)
        mask = np.asarray(Image.open(out / f"{image_path.stem}.png")) > 0
        overlay = np.asarray(rgb).copy()
        overlay[mask] = (0.45 * overlay[mask] + 0.55 * np.array([255, 0, 255])).astype(np.uint8)
        panel = Image.new("RGB", (rgb.width * 3, rgb.height))
        for i, part in enumerate((rgb, prompts, Image.fromarray(overlay))):
            panel.paste(part, (i * rgb.width, 0))
        written.append(dest / f"{image_path.stem}_quicklook.png")
        panel.save(written[-1])
    return written


def _jittered(boxes: list, j: int, rng: np.random.Generator, size: int = 256) -> list:
    """Each edge of each (xmin, ymin, xmax, ymax) box moved by a uniform integer in -j..j, kept >= 1 px and on the
    image."""
    out = []
    for x0, y0, x1, y1 in boxes:
        d = rng.integers(-j, j + 1, 4)
        a, b = min(max(x0 - d[0], 0), size - 1), min(max(y0 - d[1], 0), size - 1)
        out.append((a, b, max(min(x1 + d[2], size), a + 1), max(min(y1 + d[3], size), b + 1)))
    return out


def _array_points(truth: np.ndarray) -> list:
    """One (x, y) point per 8-connected array: its centroid's pixel if inside it, else its deepest pixel."""
    from scipy import ndimage as ndi

    from aegir.utils.components import mask_component_labels

    labels, count = mask_component_labels(truth)
    points = []
    for k in range(1, count + 1):
        component = labels == k
        row, col = (int(v) for v in ndi.center_of_mass(component))
        if not component[row, col]:
            row, col = np.unravel_index(np.argmax(ndi.distance_transform_edt(component)), component.shape)
        points.append((col + 0.5, row + 0.5))
    return points


def jitter_report(jiang: Path, seed: int = 0) -> dict:
    """Mean IoU of the offline backend on the Jiang tiles with PV (held out / tuning / all) per prompt kind."""
    from aegir.masks.offline import OfflineGrabCutBackend
    from aegir.masks.prompts import pixel_prompts
    from aegir.store.mask_files import read_image_chip
    from aegir.utils.components import mask_component_boxes, mask_component_labels

    backend = OfflineGrabCutBackend()
    tiles = []
    for index, path in enumerate(list_image_files(jiang / "images")):
        truth = read_mask(jiang / "masks" / path.name) > 0
        if truth.any():
            chip = read_image_chip(path)
            tiles.append((index % 4 == 0, np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1)), truth))
    cases = [f"jitter {j}" for j in range(6)] + ["shrink 1", "shrink 2", "points", "prior + jitter 3"]
    report: dict = {}
    for case in cases:
        rng = np.random.default_rng(seed)
        scores: dict[bool, list] = {True: [], False: []}
        for held, rgb, truth in tiles:
            boxes = mask_component_boxes(truth)
            if case.startswith("jitter"):
                prompts = pixel_prompts(256, 256, boxes=_jittered(boxes, int(case.split()[1]), rng))
            elif case.startswith("shrink"):
                k = int(case.split()[1])
                prompts = pixel_prompts(256, 256, boxes=[(a, b, max(c - k, a + 1), max(d - k, b + 1))
                                                         for a, b, c, d in boxes])
            elif case == "points":
                prompts = pixel_prompts(256, 256, points=_array_points(truth))
            else:
                labels, count = mask_component_labels(truth)
                prompts = pixel_prompts(256, 256, boxes=_jittered(boxes, 3, rng),
                                        priors=[labels == k for k in range(1, count + 1)])
            union = backend.segment(rgb, prompts).union
            scores[held].append(float((union & truth).sum() / (union | truth).sum()))
        report[case] = {"heldout": round(float(np.mean(scores[True])), 4),
                        "tuning": round(float(np.mean(scores[False])), 4),
                        "all": round(float(np.mean(scores[True] + scores[False])), 4)}
    return report


def print_jitter_report(report: dict) -> None:
    print(f"{'prompts':<18}{'held-out':>10}{'tuning':>10}{'all':>10}")
    for case, row in report.items():
        print(f"{case:<18}{row['heldout']:>10.4f}{row['tuning']:>10.4f}{row['all']:>10.4f}")
    for part in ("heldout", "all"):
        loss = report["jitter 0"][part] - report["jitter 3"][part]
        points = report["points"][part]
        print(f"[{part}] jitter-3 loss {loss:.4f} (goal <= 0.03: {'PASS' if loss <= 0.03 else 'FAIL'}); "
              f"points {points:.4f} (goal >= 0.75: {'PASS' if points >= 0.75 else 'FAIL'})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--backends", default="offline,sam,sam-hq,sam2,model")
    parser.add_argument("--checkpoint", default=None, help="checkpoint for sam / sam-hq")
    parser.add_argument("--model-checkpoint", default=None,
                        help="`aegir train` checkpoint for the model backend (e.g. from bench/train_quality.py)")
    parser.add_argument("--quicklooks", type=Path, default=Path("data") / "quicklooks" / "nrel")
    parser.add_argument("--jitter-only", action="store_true", help="only the offline prompt-robustness table")
    args = parser.parse_args()
    jiang = args.shared / "vhr" / "jiang_pv01"
    if args.jitter_only:
        print_jitter_report(jitter_report(jiang))
        return 0
    nrel = args.shared / "vhr" / "nrel_panel_segmentation" / "sample_data_set"
    stems = [p.stem for p in list_image_files(jiang / "images")]
    nonempty = {p.stem for p in list_image_files(jiang / "masks") if read_mask(p).any()}
    report: dict = {"jiang_tiles": len(stems), "tiles_with_pv": len(nonempty), "backends": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = tmp / "jiang_gt_boxes.csv"
        report["prompts"] = write_component_box_prompts(jiang / "images", jiang / "masks", prompts)
        box_baseline(prompts, tmp / "box", jiang)
        report["backends"]["box (baseline: the prompt boxes)"] = summarise(
            evaluate_masks(tmp / "box", jiang / "masks"), stems, nonempty)
        for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
            checkpoint = args.model_checkpoint if name == "model" else args.checkpoint
            options = {"checkpoint": checkpoint} if checkpoint and name != "sam2" else {}
            start = time.perf_counter()
            try:
                run = generate_masks(jiang / "images", prompts, name, tmp / name, options)
            except MaskBackendError as exc:
                report["backends"][name] = {"unavailable": str(exc)}
                continue
            seconds = time.perf_counter() - start
            summary = summarise(evaluate_masks(tmp / name, jiang / "masks"), stems, nonempty)
            summary.update({"seconds": round(seconds, 2), "prompts_per_s": round(run.prompts_used / seconds, 1),
                            "version": run.backend_version})
            if name == "model":
                unseen = unseen_stems(checkpoint, stems)
                summary["mean_iou_unseen_cells"] = mean_iou_of(tmp / name, jiang, unseen & nonempty)
                summary["tiles_unseen_cells"] = len(unseen & nonempty)
            report["backends"][name] = summary
        nrel_out = tmp / "nrel"
        start = time.perf_counter()
        run = generate_masks(nrel / "images", nrel / "annotations.csv", "offline", nrel_out)
        looks = quicklooks(nrel / "images", nrel / "annotations.csv", nrel_out, args.quicklooks)
        report["nrel_offline"] = {"images": len(run.written), "prompts": run.prompts_used,
                                  "seconds": round(time.perf_counter() - start, 2),
                                  "skipped": run.skipped, "quicklooks": str(args.quicklooks), "files": len(looks)}
    report["offline_prompt_robustness"] = jitter_report(jiang)
    print(json.dumps(report, indent=1))
    print_jitter_report(report["offline_prompt_robustness"])
    for name, summary in report["backends"].items():
        if summary.get("mean_iou_all") is not None:
            goal = "met" if summary["mean_iou_all"] >= 0.85 else "NOT met"
            print(f"{name}: mean IoU {summary['mean_iou_all']} over the tiles with PV (goal >= 0.85: {goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

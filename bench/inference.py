"""Benchmark: peak memory and chips/s of ``aegir infer region`` as the region grows (1×, 4×, 16× area).

Data: the real Austin tiles (NREL / Google-static z19, 640² px, georeferenced from their names); the 1× region is
one tile, 4× a 2×2 block, 16× a 4×4 block of neighbouring tiles (linked into a temporary folder). Each size runs
in a fresh subprocess with its own lakehouse: plan (S2 level ``--plan-level``, default 16 ≈ 140 m cells, smaller
than one tile so every size has whole cells), per-cell mosaic, blended probabilities, COGs, detections. Peak RSS
is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; "run" is that peak minus the RSS after imports and model set-up.
Flat memory (goal ≤ 1.15×): the run peak should be bounded by a few cells' windows, whatever the region's size.

Model: by default the shipped architecture (U-Net, ResNet-18 encoder) with random weights — the compute of a
trained model; ``--model conv`` a tiny random conv net (pipeline overhead dominates); ``--checkpoint best.ckpt``
a trained model. Chips are ``--tile-px``² model tiles.

Pipeline efficiency: one more run (``--efficiency-size`` tiles) records every batch the model is given; after the
region run, the bare forward of the same model over those same batches (already in memory) is timed. Efficiency =
region chips/s ÷ bare chips/s (goal ≥ 0.9 on CPU): what the reads, mosaics, blending, detections and stores cost.

TTA: one more run at ``--tta-size`` tiles with ``--tta`` (the eight dihedral views per chip): chips/s with and
without.

Model: the random U-Net is seeded and its head's bias shifted so that ``--pv-share`` (default 1 %) of the first
tile's pixels come out as PV; unshifted, its 7,206 detections on 16 tiles chained into one installation, and
that union, not the engine, set the peak (3.6 GB).

Memory is flat once the region holds full-size chips. A region smaller than one chip has smaller forward passes:
the one-tile 1× region holds only 641² chips, and one forward pass of a 1024² chip needs ~330 MB more than one of
641² (measured alone). The bench prints the ratio from 1× and from the first size whose chips are full-size.

Measured (idle 2-core machine, U-Net with random weights, 1 torch thread, level-16 cells, one chip per forward
pass, the engine's CPU default):
* 1024² chips, overlap 288: peak RSS 1241 / 1645 / 1686 / 1785 MB at 1× / 4× / 16× / 25× (from 1×: 1.44×; from
  4×, the first size with full chips: 1.03× at 16×, 1.09× at 25×). Efficiency 0.95 at 16 tiles (30 chips: region
  0.37 ÷ bare 0.39 chips/s). TTA 0.06 vs 0.44 chips/s at 4 tiles (7.6× the time per chip).
* 512² chips, overlap 64 (``--tile-px 512 --overlap-px 64 --efficiency-size 4 --tta-size 1``): peak RSS 1075 /
  1130 / 1157 MB at 1× / 4× / 16× (1.08×); efficiency 0.84 at 4 tiles (25 chips).

Run: ``python bench/inference.py [--sizes 1,4,16] [--checkpoint CKPT | --model unet|conv] [--plan-level 16]
[--tile-px 1024] [--overlap-px 288] [--batch-size N] [--pv-share 0.01] [--threads 1] [--efficiency-size 16] [--tta-size 4]``.
Prints one row per size (with its largest chip), the ratios to 1×, the efficiency and the TTA cost, measured in one run.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from aegir.sample_data import AUSTIN_TILES, link_tile_block

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
AUSTIN = SHARED_DATA / AUSTIN_TILES


def _rss_mb() -> float:
    """Current resident set size in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _link_block(dest: Path, side: int) -> Path:
    """A folder of links to a ``side`` × ``side`` block of neighbouring Austin tiles (names are lat_lon.png)."""
    try:
        return link_tile_block(AUSTIN, dest, side, side)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


class _ConvNet:
    """A fixed random 4-layer conv net (3→8→8→8→1, sigmoid): ``predict_batch((B, 3, h, w) uint8)`` → (B, h, w)."""

    data_version, dataset_uri = -1, "bench://random-conv"

    def __init__(self) -> None:
        import torch

        torch.manual_seed(0)
        layers = []
        for c_in, c_out in ((3, 8), (8, 8), (8, 8), (8, 1)):
            layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.Tanh()]
        self.net = torch.nn.Sequential(*layers[:-1], torch.nn.Sigmoid()).eval()

    def predict_batch(self, tiles):
        import torch

        with torch.no_grad():
            return self.net(torch.from_numpy(tiles.astype("float32") / 255.0))[:, 0].numpy()


class _RecordingModel:
    """Passes batches to the model's tile predictor (:func:`aegir.training.predictor.image_predictor`), noting the
    largest chip; with ``keep``, a copy of each batch, so the bare forward can be timed on the very chips the
    region run predicted."""

    def __init__(self, model, keep: bool) -> None:
        from aegir.training.predictor import image_predictor

        self.batches: list = []
        self.keep, self.largest_chip = keep, (0, 0)
        self.standardized, self.predict_tiles = image_predictor(model)
        self.data_version, self.dataset_uri = model.data_version, model.dataset_uri
        self.device = getattr(model, "device", "cpu")

    def predict_standardized(self, tiles):
        if self.keep:
            self.batches.append(tiles.copy())
        self.largest_chip = max(self.largest_chip, tuple(tiles.shape[-2:]), key=lambda hw: hw[0] * hw[1])
        return self.predict_tiles(tiles)


def _unet(args: argparse.Namespace, tiles: Path):
    """The shipped architecture (U-Net, ResNet-18 encoder, 3 bands) with random weights (seed 0): the compute of a
    trained model, without needing one. Its head's bias is shifted so that ``args.pv_share`` of the first tile's
    pixels come out as PV (≥ 0.5), like a trained model's sparse detections; unshifted, its 7,206 detections on 16
    tiles chained into one installation, whose union, not the engine, set the peak memory."""
    import torch

    from aegir.training.inference_model import SegmentationModel
    from aegir.training.litmodule import SegmentationNet

    torch.manual_seed(0)
    net = SegmentationNet("unet", "resnet18", [120.0] * 3, [50.0] * 3)
    payload = {"config": {"arch": "unet", "encoder": "resnet18"}, "data_version": -1,
               "dataset_uri": "bench://untrained-unet", "band_stats": {"mean": [120.0] * 3, "std": [50.0] * 3},
               "state_dict": net.state_dict()}
    model = SegmentationModel(payload, device="cpu")
    _shift_to_pv_share(model, sorted(tiles.glob("*.png"))[0], args.pv_share)
    return model


def _shift_to_pv_share(model, tile_png: Path, pv_share: float) -> None:
    """Shifts ``model``'s head bias so that ``pv_share`` of ``tile_png``'s pixels have probability ≥ 0.5."""
    import numpy as np
    import torch
    from PIL import Image

    image = np.asarray(Image.open(tile_png).convert("RGB")).transpose(2, 0, 1)
    probability = model.predict_standardized(model.standardized(image)[None])[0].astype(np.float64)
    logits = np.log(np.clip(probability, 1e-12, 1.0)) - np.log(np.clip(1.0 - probability, 1e-12, 1.0))
    with torch.no_grad():
        model.net.net.segmentation_head[0].bias -= float(np.quantile(logits, 1.0 - pv_share))


def _bare_chips_per_s(predict_tiles, batches: list) -> float:
    """Chips/s of the model's forward alone over ``batches`` (already in memory), after one warm-up batch."""
    predict_tiles(batches[0])
    started = time.perf_counter()
    for batch in batches:
        predict_tiles(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - started)


def child(args: argparse.Namespace) -> None:
    """One size in this (fresh) process: print a JSON line with its numbers."""
    import torch

    from aegir.config import Settings
    from aegir.pipelines.region import infer_region

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    tiles = _link_block(work / "tiles", args.side)
    if args.checkpoint:
        from aegir.training.inference_model import load_segmentation_model

        checkpoint, model = Path(args.checkpoint), load_segmentation_model(args.checkpoint, device="cpu")
    else:
        checkpoint, model = work / "model.ckpt", _unet(args, tiles) if args.model == "unet" else _ConvNet()
        checkpoint.write_bytes(f"{args.model}: provenance only".encode())
    model = _RecordingModel(model, keep=args.efficiency)
    settings = Settings(lancedb_root=str(work / "lancedb"), ducklake_catalog=str(work / "lake" / "catalog.ducklake"),
                        ducklake_data_path=str(work / "lake" / "files") + "/")
    baseline = _rss_mb()
    report = infer_region(settings, checkpoint, work / "out", tiles, plan_level=args.plan_level,
                          tile_px=args.tile_px, overlap_px=args.overlap_px, model=model, tta=args.tta,
                          batch_size=args.batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bare = _bare_chips_per_s(model.predict_tiles, model.batches) if args.efficiency else None
    print(json.dumps({"bare_chips_per_s": bare, "tiles": args.side**2, "largest_chip": model.largest_chip,
                      "cells": report.cells, "chips": report.chips,
                      "seconds": report.seconds, "chips_per_s": report.chips_per_s, "detections": report.detections,
                      "baseline_mb": baseline, "peak_mb": peak, "failed": len(report.failed)}))


def _run_size(side: int, args: argparse.Namespace, root: Path, efficiency: bool = False, tta: bool = False) -> dict:
    name = f"x{side * side}" + ("_efficiency" if efficiency else "") + ("_tta" if tta else "")
    command = [sys.executable, __file__, "--child", "--side", str(side), "--work", str(root / name),
               "--plan-level", str(args.plan_level), "--tile-px", str(args.tile_px), "--overlap-px",
               str(args.overlap_px), "--threads", str(args.threads), "--model", args.model, "--pv-share",
               str(args.pv_share)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    if args.checkpoint:
        command += ["--checkpoint", args.checkpoint]
    if efficiency:
        command += ["--efficiency"]
    if tta:
        command += ["--tta"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        raise SystemExit(f"size {side}×{side} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _print_flatness(rows: list[dict], label: str, base: dict) -> None:
    """One line: the largest peak RSS of ``rows`` over ``base``'s, against the goal (≤ 1.15×)."""
    worst = max(rows, key=lambda r: r["peak_mb"])
    ratio = worst["peak_mb"] / base["peak_mb"]
    print(f"peak RSS {label}: max {ratio:.2f}x of {base['peak_mb']:.0f} MB (at {worst['tiles']} tiles); "
          f"{'flat' if ratio <= 1.15 else 'NOT flat'} (goal <= 1.15x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16", help="Region sizes in tiles (squares: 1, 4, 9, 16, 25).")
    parser.add_argument("--checkpoint", default=None, help="A trained best.ckpt (default: --model).")
    parser.add_argument("--model", choices=("unet", "conv"), default="unet",
                        help="Without --checkpoint: the shipped U-Net / ResNet-18 with random weights (the compute of "
                             "a trained model) or a tiny random conv net (pipeline overhead dominates).")
    parser.add_argument("--tta-size", type=int, default=4, help="Region size (tiles) of the TTA on/off run.")
    parser.add_argument("--efficiency-size", type=int, default=16,
                        help="Region size (tiles) of the efficiency run: region chips/s ÷ bare forward chips/s.")
    parser.add_argument("--efficiency", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan-level", type=int, default=16)
    parser.add_argument("--tile-px", type=int, default=1024)
    parser.add_argument("--overlap-px", type=int, default=288)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Model tiles per forward pass (default: the engine's, 1 on the CPU).")
    parser.add_argument("--pv-share", type=float, default=0.01,
                        help="Share of PV pixels the random U-Net is calibrated to (its detections' density).")
    parser.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sides = [math.isqrt(int(s)) for s in args.sizes.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aegir-bench-infer-") as tmp:
        rows = []
        for side in sides:
            rows.append(_run_size(side, args, Path(tmp)))
            print(f"measured {side}×{side} tiles: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
        efficiency = _run_size(math.isqrt(args.efficiency_size), args, Path(tmp), efficiency=True)
        measured = {efficiency["tiles"]: efficiency} | {r["tiles"]: r for r in rows}  # a plain run, not recording
        without_tta = measured.get(args.tta_size) or _run_size(math.isqrt(args.tta_size), args, Path(tmp))
        with_tta = _run_size(math.isqrt(args.tta_size), args, Path(tmp), tta=True)
    first = rows[0]
    model = f"checkpoint {args.checkpoint}" if args.checkpoint else f"{args.model} (random weights)"
    print(f"aegir infer region: Austin tiles, S2 level {args.plan_level} cells, {args.tile_px}² chips "
          f"(overlap {args.overlap_px}), model {model}, {args.threads} torch thread(s)")
    print(f"{'area':>5} {'tiles':>5} {'cells':>5} {'chips':>6} {'largest':>9} {'detect':>6} {'chips/s':>8} "
          f"{'peak MB':>8} {'run MB':>7} {'peak/1x':>8} {'run/1x':>7}")
    first_run = max(first["peak_mb"] - first["baseline_mb"], 1e-9)
    for row in rows:
        run_mb = row["peak_mb"] - row["baseline_mb"]
        largest = "x".join(map(str, row["largest_chip"]))
        print(f"{row['tiles'] // first['tiles']:>4}x {row['tiles']:>5} {row['cells']:>5} {row['chips']:>6} "
              f"{largest:>9} {row['detections']:>6} {row['chips_per_s']:>8.2f} {row['peak_mb']:>8.0f} {run_mb:>7.0f} "
              f"{row['peak_mb'] / first['peak_mb']:>8.2f} {run_mb / first_run:>7.2f}")
    _print_flatness(rows, "from 1x", first)
    full = [r for r in rows if list(r["largest_chip"]) == [args.tile_px, args.tile_px]]
    if full and full[0] is not first:
        _print_flatness(full, f"from {full[0]['tiles'] // first['tiles']}x, the first size with full "
                        f"{args.tile_px}² chips (a smaller region's forward passes are smaller)", full[0])
    ratio = efficiency["chips_per_s"] / efficiency["bare_chips_per_s"]
    print(f"pipeline efficiency ({efficiency['tiles']} tiles, {efficiency['chips']} chips): region "
          f"{efficiency['chips_per_s']:.2f} chips/s ÷ bare forward {efficiency['bare_chips_per_s']:.2f} chips/s "
          f"on the same chips in memory = {ratio:.2f} (goal ≥ 0.9)")
    print(f"test-time augmentation (D4, 8 views; {with_tta['tiles']} tiles): {with_tta['chips_per_s']:.2f} chips/s with, "
          f"{without_tta['chips_per_s']:.2f} without: {without_tta['chips_per_s'] / with_tta['chips_per_s']:.1f}× the "
          f"time per chip")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

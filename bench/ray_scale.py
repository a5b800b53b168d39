"""Benchmark: single process vs Ray (local cluster) for the ``training_data`` build and chip predictions.

Data: the 60 real Jiang PV01 tiles + masks. Build: ``build_dataset_from_images`` vs ``build_dataset_ray`` into a
fresh table each repeat (Ray's workers warmed by one untimed run). Predictions: ``SegmentationModel.predict_proba``
in a loop (torch's default threads) vs ``predict_table_ray`` (one model actor per worker, one torch thread each;
actor start-up and checkpoint load included, as in a real run) on ``--chips`` chips, with a randomly initialised
U-Net/ResNet-18 checkpoint (speed does not depend on the weights).

Run: ``python bench/ray_scale.py [--cpus 2] [--repeats 3] [--chips 24]``. Prints rows/s and ratios of one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import aegir.training  # noqa: F401  (torchvision shim first)
import ray
import torch

from aegir.config import Settings
from aegir.pipelines import ray_scale
from aegir.pipelines.dataset import build_dataset_from_images
from aegir.store import lance_io
from aegir.store.chip_codec import decode_chip
from aegir.training.config import TrainConfig
from aegir.training.inference_model import load_segmentation_model
from aegir.training.litmodule import SegmentationLitModule, checkpoint_payload

JIANG = Path(__file__).resolve().parents[2] / "shared" / "data" / "vhr" / "jiang_pv01"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_build(settings: Settings, repeats: int) -> tuple[float, float]:
    """Median seconds of (single-process, Ray) builds of the 60 tiles into fresh tables."""
    root = Path(settings.lancedb_root)
    ray_scale.build_dataset_ray(settings, JIANG / "images", JIANG / "masks", str(root / "warm"))
    single = [_timed(lambda i=i: build_dataset_from_images(
        settings, JIANG / "images", JIANG / "masks", str(root / f"single{i}"))) for i in range(repeats)]
    on_ray = [_timed(lambda i=i: ray_scale.build_dataset_ray(
        settings, JIANG / "images", JIANG / "masks", str(root / f"ray{i}"))) for i in range(repeats)]
    return statistics.median(single), statistics.median(on_ray)


def bench_predict(settings: Settings, chips: int, workers: int) -> tuple[float, float, float]:
    """Seconds of (single-process loop with 1 torch thread, with the default threads, Ray) predictions of
    ``chips`` chips of the warm table."""
    uri = str(Path(settings.lancedb_root) / "warm")
    checkpoint = Path(settings.lancedb_root).parent / "best.ckpt"
    module = SegmentationLitModule(TrainConfig(encoder="resnet18"), {"mean": [110.0] * 3, "std": [50.0] * 3})
    torch.save(checkpoint_payload(module, 0, uri, None, {}, 0), checkpoint)
    rows = lance_io.open_training_table(uri, settings.lancedb_root).to_arrow().slice(0, chips).to_pylist()
    stems = ", ".join(f"'{r['metadata']['sample_id']}'" for r in rows)
    model = load_segmentation_model(str(checkpoint), "cpu")
    images = [decode_chip(r["vhr_image_chip"], r["metadata"]["vhr_encoding"], r["metadata"]["vhr_shape"],
                          r["metadata"]["vhr_dtype"]) for r in rows]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    single_1 = _timed(lambda: [model.predict_proba(image) for image in images])
    torch.set_num_threads(threads)
    single = _timed(lambda: [model.predict_proba(image) for image in images])
    on_ray = _timed(lambda: ray_scale.predict_table_ray(settings, uri, checkpoint, where=f"metadata.sample_id IN "
                                                        f"({stems})", num_workers=workers, batch_size=4))
    return single_1, single, on_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chips", type=int, default=24)
    parser.add_argument("--workers", type=int, default=None, help="model actors (default: --cpus)")
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(lancedb_root=str(Path(tmp) / "lancedb"))
            single, on_ray = bench_build(settings, args.repeats)
            print(f"build, 60 tiles: single process {60 / single:.0f} rows/s ({single:.2f} s), Ray {args.cpus} CPUs "
                  f"{60 / on_ray:.0f} rows/s ({on_ray:.2f} s); Ray / single = {single / on_ray:.2f}×")
            workers = args.workers or args.cpus
            single_1, single, on_ray = bench_predict(settings, args.chips, workers)
            print(f"predict, {args.chips} chips 256²: single process {args.chips / single_1:.2f} chips/s with 1 "
                  f"torch thread ({single_1:.1f} s), {args.chips / single:.2f} chips/s with "
                  f"{torch.get_num_threads()} ({single:.1f} s); Ray {workers} actor(s) × 1 thread "
                  f"{args.chips / on_ray:.2f} chips/s ({on_ray:.1f} s incl. start-up); "
                  f"Ray / best single = {min(single_1, single) / on_ray:.2f}×")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

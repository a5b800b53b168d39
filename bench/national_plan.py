"""Benchmark: a national plan — Germany covered by level-14 S2 cells, ranked by the shared OSM Germany PV labels,
stored as a ledger in DuckLake. Goal (issue 16, item 6): covering built AND stored in < 60 s.

AOI: Germany from the Natural Earth 1:110m admin-0 countries shipped in the installed ``pyogrio`` (the offline
boundary ``aegir plan --aoi Germany`` resolves; geodesic area printed), or ``--aoi FILE|NAME``. The labels
(``labels/osm_pv_germany_austria/germany_photovoltaic.shp``, 4,458 OSM PV farms) are imported into a temporary
lakehouse with the ``aegir labels import`` job first (timed apart: it is not part of the plan). The plan step is
:func:`aegir.pipelines.plan.plan_national`: cover (vectorised S2 covering with interior expansion), rank
(searchsorted / bincount / lexsort), store (one Arrow batch, one DuckLake transaction).

With ``--chips-per-s X`` or ``--bench-json FILE`` (a JSON line with ``chips_per_s``, e.g. a ``bench/inference.py``
child line or ``aegir infer region --json``) it also prints the compute estimate on paper.

Run: ``python bench/national_plan.py [--aoi Germany] [--level 14] [--chips-per-s 12.7 --gsd-m 0.3]``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from aegir.config import load_settings
from aegir.pipelines.labels import import_labels
from aegir.pipelines.plan import compute_estimate, plan_national
from aegir.sample_data import sample_label_set
from aegir.store import plan_files

GOAL_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--aoi", default="Germany", help="AOI file or country name (default: Germany).")
    parser.add_argument("--level", type=int, default=14)
    parser.add_argument("--chips-per-s", type=float, default=None, help="Measured inference chips/s.")
    parser.add_argument("--bench-json", default=None, help="A JSON (lines) file with chips_per_s.")
    parser.add_argument("--chip-px", type=int, default=512)
    parser.add_argument("--overlap-px", type=int, default=64)
    parser.add_argument("--gsd-m", type=float, default=0.3, help="Imagery GSD in m/px for the estimate.")
    args = parser.parse_args()
    aoi, aoi_name = plan_files.read_plan_aoi(args.aoi)
    item = sample_label_set("osm_germany")
    with tempfile.TemporaryDirectory(prefix="aegir-bench-plan-") as tmp:
        settings = load_settings().replace(ducklake_catalog=f"{tmp}/catalog.ducklake",
                                           ducklake_data_path=f"{tmp}/files/")
        started = time.perf_counter()
        imported = import_labels(settings, item.path(settings.sample_data_dir), item.dataset)
        import_s = time.perf_counter() - started
        started = time.perf_counter()
        report = plan_national(settings, "bench-national", aoi, aoi_name, plan_level=args.level,
                               label_datasets=(item.dataset,))
        total = time.perf_counter() - started
    print(f"AOI {report.aoi}: {report.area_km2:,.0f} km² (geodesic, WGS84)")
    print(f"labels: {imported.rows_read:,} {item.dataset} rows imported in {import_s:.1f} s (not part of the plan)")
    print(f"plan: {report.cells:,} level-{report.level} cells ({report.area_km2 / report.cells:.3f} km²/cell), "
          f"{report.cells_with_labels:,} with labels, {report.cells_with_context:,} with labels in their "
          f"level-{report.context_level} neighbourhood; {report.labels:,} labels, {report.detections:,} detections")
    seconds = report.seconds
    print(f"cover {seconds['cover']:.2f} s | rank {seconds['rank']:.2f} s | store {seconds['store']:.2f} s | "
          f"plan_national total {total:.2f} s (incl. connect and the label query)")
    stored = int(report.progress["pending"])
    print(f"ledger: {stored:,} pending rows of plan {report.plan_id} read back from DuckLake")
    ok = total < GOAL_S and stored == report.cells
    print(f"goal: built and stored in < {GOAL_S:.0f} s: {'met' if ok else 'NOT met'} ({total:.1f} s, "
          f"{stored:,} of {report.cells:,} cells stored)")
    chips_per_s, source = args.chips_per_s, "--chips-per-s"
    if args.bench_json:
        chips_per_s, source = plan_files.read_throughput(args.bench_json)["chips_per_s"], args.bench_json
    if chips_per_s:
        est = compute_estimate(chips_per_s, args.chip_px, args.overlap_px, args.gsd_m, report.area_km2, source)
        print(f"estimate on paper: {est.chip_px} px chips ({est.overlap_px} px overlap) at {est.gsd_m} m/px → "
              f"{est.chips_per_km2:,.1f} chips/km²; at {est.chips_per_s:g} chips/s ({source}) → "
              f"{est.gpu_hours_per_1000_km2:,.2f} GPU-hours per 1,000 km², {est.gpu_hours_aoi:,.0f} GPU-hours for "
              f"the AOI")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

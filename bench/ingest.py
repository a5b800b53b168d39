"""Benchmark: label rows/s for the full import of every shared label set (S2 l10/13/17 + H3 + geodesic area).

Goal (issue 2): ≥ 5,000 rows/s on 2 cores. Prints per-dataset and total throughput for a first import into an
empty lakehouse and for an idempotent re-import, measured in one run. Run: `python bench/ingest.py`.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from aegir.config import Settings, load_settings
from aegir.pipelines.labels import import_labels
from aegir.sample_data import SAMPLE_LABEL_SETS

GOAL_ROWS_PER_S = 5_000


def _import_all(settings: Settings) -> list[tuple[str, int, float]]:
    timings = []
    for item in SAMPLE_LABEL_SETS:
        start = time.perf_counter()
        report = import_labels(settings, item.path(settings.sample_data_dir), item.dataset, doi=item.doi)
        timings.append((item.dataset, report.rows_read, time.perf_counter() - start))
    return timings


def main() -> int:
    base = load_settings()
    with tempfile.TemporaryDirectory(prefix="aegir-bench-ingest-") as tmp:
        root = Path(tmp)
        settings = base.replace(
            ducklake_catalog=str(root / "catalog.ducklake"), ducklake_data_path=str(root / "files") + "/"
        )
        first = _import_all(settings)
        second = _import_all(settings)
    print(f"{'dataset':<20}{'rows':>8}{'first s':>10}{'rows/s':>10}{'re-import s':>13}{'rows/s':>10}")
    for (name, rows, t1), (_, _, t2) in zip(first, second):
        print(f"{name:<20}{rows:>8}{t1:>10.2f}{rows / t1:>10.0f}{t2:>13.2f}{rows / t2:>10.0f}")
    rows = sum(r for _, r, _ in first)
    total_first, total_second = sum(t for *_, t in first), sum(t for *_, t in second)
    rate = rows / total_first
    print(f"{'total':<20}{rows:>8}{total_first:>10.2f}{rate:>10.0f}{total_second:>13.2f}{rows / total_second:>10.0f}")
    print(f"first import: {rate:,.0f} rows/s = {rate / GOAL_ROWS_PER_S:.2f}× the goal of {GOAL_ROWS_PER_S:,} rows/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

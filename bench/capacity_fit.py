"""DC capacity from array area: fit ``log(kWp) = a + b·log(area_m2)`` on USPVDB and score it on held-out states.

Reads USPVDB's own columns (``p_area`` m², ``p_cap_dc`` MW, ``p_state``) and runs the ``capacity_fit`` stage
(:mod:`aegir.dataflows.capacity_fit`): states are split by ``sha1(state) % 10`` (the first ``--heldout-tenths``
buckets held out), the relation is fitted on the training states, the interval comes from leave-one-state-out
residual quantiles on the training states, and MAPE / median APE / interval coverage are reported on the
held-out states. ``--write`` stores the relation and these numbers in ``src/aegir/defaults/capacity_dc.toml``,
which ``aegir infer region`` uses for the installations' capacity. Utility-scale (ground-mounted, ≥ 1 MW) only:
rooftop systems pack differently (see the dataflow's docstring).

    python bench/capacity_fit.py [--csv ../shared/data/labels/uspvdb/uspvdb_v3_0_20250430.csv] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict
from pathlib import Path

from aegir.pipelines import run_stage
from aegir.store import capacity_files

HERE = Path(__file__).resolve().parent
CSV = HERE.parents[1] / "shared" / "data" / "labels" / "uspvdb" / "uspvdb_v3_0_20250430.csv"
DEFAULTS = capacity_files.default_capacity_path()  # src/aegir/defaults/capacity_dc.toml (editable install)
HEADER = """DC capacity of a PV installation from its area (m²): log(kWp) = intercept + slope * log(area_m2).
Interval: estimate * exp(log_residual_low) ... estimate * exp(log_residual_high) at interval_quantiles.
Fitted on USPVDB (ground-mounted utility-scale plants, p_area = digitised array outline incl. row spacing,
p_cap_dc MW DC): rooftop systems are packed differently and areas outside area_min_m2..area_max_m2 are
extrapolated, so treat such estimates as indicative. Written by `python bench/capacity_fit.py --write`."""


def fit(csv: Path, heldout_tenths: int) -> dict:
    """The fitted relation and its scores from the ``capacity_fit`` stage."""
    rows = capacity_files.read_uspvdb_capacity(csv)
    result = run_stage("capacity_fit", ["fitted_capacity_relation", "capacity_fit_scores"],
                       {"uspvdb_rows": rows, "heldout_tenths": heldout_tenths,
                        "capacity_source": f"USPVDB {csv.name}"})
    return {"relation": result["fitted_capacity_relation"], "scores": result["capacity_fit_scores"]}


def params(relation, scores: dict, heldout_tenths: int) -> dict:
    """The ``[capacity_dc]`` table: relation fields, the split rule and the train / held-out numbers."""
    table = asdict(relation) | {"interval_quantiles": list(relation.interval_quantiles),
                                "split": f"held out: states with int(sha1(p_state)) % 10 < {heldout_tenths}",
                                "rows_read": scores["rows_read"], "rows_dropped": scores["rows_dropped"]}
    for part in ("train", "heldout"):
        table[part] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in scores[part].items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, default=CSV, help="USPVDB CSV (p_area, p_cap_dc, p_state, case_id)")
    parser.add_argument("--heldout-tenths", type=int, default=2, help="state-hash buckets held out (of 10)")
    parser.add_argument("--write", action="store_true", help=f"write the relation to {DEFAULTS}")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args()
    result = fit(args.csv, args.heldout_tenths)
    relation, scores = result["relation"], result["scores"]
    table = params(relation, scores, args.heldout_tenths)
    if args.json:
        print(json.dumps(table))
    else:
        print(f"{args.csv.name}: {scores['rows_read']} rows, {scores['rows_dropped']} dropped (no area/capacity)")
        print(f"log(kWp) = {relation.intercept:.4f} + {relation.slope:.4f} * log(area_m2); interval x "
              f"{math.exp(relation.log_residual_low):.3f} .. {math.exp(relation.log_residual_high):.3f} "
              f"(out-of-fold quantiles {relation.interval_quantiles})")
        print(f"{'part':8} {'rows':>5} {'states':>6} {'MAPE':>6} {'MdAPE':>6} {'logRMSE':>7} {'cover':>6} "
              f"{'below':>6} {'above':>6}")
        for part in ("train", "heldout"):
            s = scores[part]
            print(f"{part:8} {s['rows']:5d} {len(s['states']):6d} {s['mape']:6.3f} {s['median_ape']:6.3f} "
                  f"{s['log_rmse']:7.3f} {s['coverage']:6.3f} {s['below_low']:6.3f} {s['above_high']:6.3f}")
        print(f"held-out states: {', '.join(scores['heldout']['states'])}")
    if args.write:
        print(f"wrote {capacity_files.write_capacity_params(table, DEFAULTS, HEADER)}")


if __name__ == "__main__":
    main()

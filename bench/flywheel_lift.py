"""Does the flywheel lift? Rounds 0..3 of ``aegir flywheel`` on the shipped config, over several seeds.

Protocol (the shipped ``aegir/defaults/flywheel.toml``): Jiang PV01 is split by level-16 S2 cell into a labelled
third (the seed), an unlabelled third (the target: the loop infers on it and may pseudo-label it; its masks are
read only to score) and a test third (seed test); the central 3 × 3 block of the Austin tiles is a second,
truthless target; the NREL tiles with their box annotations score transfer. The seed changes the partition salt
and the training seed, so every seed is a different split. Round 0 trains on the seed alone; rounds 1..3 add the
gated pseudo-labels and warm-start from the previous round with the same budget.

``--control`` runs the same rounds with the pseudo-labels switched off (``max_positive_share = 0``,
``max_negative_share = 0``): warm-start and the per-round budget alone. The difference between the two is what
the pseudo-labels add; the lift of the control is what more training adds.

Printed: the per-round table (mean ± sample standard deviation over seeds) of seed-test pixel IoU, target pixel IoU,
target object F1, transfer box F1, the share of accepted candidates on true PV (target truth, scoring
only), pseudo-label windows trained on; then the goals — round 3 − round 0 ≥ 0.05 target
pixel IoU and ≥ 0.03 seed-test pixel IoU, no round below round 0 on either (per seed), transfer box F1 ≥ 0.5 by
round 3 — and the wall-clock minutes of one run. Results: ``OUT/flywheel_lift.json``.

    python bench/flywheel_lift.py [--seeds 0,1,2] [--rounds 3] [--control] [--train KEY=VALUE ...]
                                  [--set KEY=VALUE ...] [--out bench-out/flywheel_lift]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import tomllib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aegir.config import load_settings  # noqa: E402
from aegir.pipelines.flywheel import load_flywheel_config, run_flywheel  # noqa: E402

COLUMNS = ("seed_test_iou", "target_iou", "target_object_f1", "transfer_f1", "accepted_precision", "pseudo_positive",
           "pseudo_negative")


def run_seed(seed: int, rounds: int, control: bool, out: Path, train: dict | None = None,
             flywheel: dict | None = None) -> tuple[list[dict], float]:
    """One flywheel run (its own LanceDB root under ``out``); returns the per-round table and its minutes."""
    settings = load_settings().replace(lancedb_root=str(out / "lancedb"))
    overrides: dict = (flywheel or {}) | {"seed": seed, "rounds": rounds} | ({"train": train} if train else {})
    if control:
        overrides |= {"max_positive_share": 0.0, "max_negative_share": 0.0}
    started = time.perf_counter()
    table = run_flywheel(settings, out / "run", load_flywheel_config(**overrides),
                         on_step=lambda r, s, res, skipped: print(f"  seed {seed} round {r} · {s}: "
                                                                  f"{'done earlier' if skipped else res['seconds']}",
                                                                  flush=True))
    return table, (time.perf_counter() - started) / 60


def _mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def summary(tables: dict[int, list[dict]]) -> list[dict]:
    """Per round: every column's values over seeds."""
    rounds = sorted({row["round"] for table in tables.values() for row in table})
    return [{"round": r, **{c: [next(row[c] for row in t if row["round"] == r) for t in tables.values()]
                            for c in COLUMNS}} for r in rounds]


def goals(tables: dict[int, list[dict]]) -> dict:
    """The issue's goals per seed and on the mean."""
    def lift(table: list[dict], column: str) -> float:
        return table[-1][column] - table[0][column]

    per_seed = {}
    for seed, table in tables.items():
        per_seed[seed] = {
            "target_lift": round(lift(table, "target_iou"), 4),
            "seed_test_lift": round(lift(table, "seed_test_iou"), 4),
            "no_round_below_round_0": all(row["target_iou"] >= table[0]["target_iou"]
                                          and row["seed_test_iou"] >= table[0]["seed_test_iou"] for row in table),
            "transfer_f1_last": table[-1]["transfer_f1"]}
    mean = {key: statistics.mean(s[key] for s in per_seed.values())
            for key in ("target_lift", "seed_test_lift", "transfer_f1_last")}
    return {"per_seed": per_seed, "mean": mean,
            "met": {"target_lift >= 0.05": mean["target_lift"] >= 0.05,
                    "seed_test_lift >= 0.03": mean["seed_test_lift"] >= 0.03,
                    "no round below round 0 (every seed)": all(s["no_round_below_round_0"]
                                                              for s in per_seed.values()),
                    "transfer F1 >= 0.5": mean["transfer_f1_last"] >= 0.5}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--control", action="store_true", help="pseudo-labels off: warm-start and budget only")
    parser.add_argument("--train", action="append", default=[], metavar="KEY=VALUE",
                        help="a [flywheel.train] override (TOML value), e.g. --train ema_decay=0.9; repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="flywheel",
                        help="a [flywheel] override (TOML value), e.g. --set warm_start_lr_scale=0.3; repeatable")
    parser.add_argument("--out", default="bench-out/flywheel_lift")
    args = parser.parse_args()

    def parsed(pairs: list[str]) -> dict:
        return {key.strip(): tomllib.loads(f"v = {value}")["v"] for key, value in (t.split("=", 1) for t in pairs)}

    train, flywheel = parsed(args.train), parsed(args.flywheel)
    arm = ("control" if args.control else "flywheel") + "".join(f"_{k}={v}" for k, v in (flywheel | train).items())
    out = Path(args.out) / arm
    tables, minutes = {}, {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        tables[seed], minutes[seed] = run_seed(seed, args.rounds, args.control, out / f"seed_{seed}", train,
                                               flywheel)
    rows = summary(tables)
    print(f"\n{arm}{' (no pseudo-labels)' if args.control else ''}: {len(tables)} seeds, mean ± sd")
    print("round | " + " | ".join(COLUMNS))
    for row in rows:
        print(f"{row['round']} | " + " | ".join(_mean_sd(row[c]) for c in COLUMNS))
    result = goals(tables)
    print("per seed:", json.dumps(result["per_seed"]))
    means = {k: round(v, 4) for k, v in result["mean"].items()}
    print("goals:", json.dumps(result["met"]), "means:", json.dumps(means))
    print(f"minutes per run: {_mean_sd(list(minutes.values()))}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "flywheel_lift.json").write_text(json.dumps({"tables": tables, "summary": rows, "goals": result,
                                                        "minutes": minutes}, indent=1))


if __name__ == "__main__":
    main()

"""From coarse labels to a model: Mask Factory masks made from polygons / boxes / points vs pixel ground truth,
and the speed of the label × image join.

**Label → model.** The Jiang PV01 ground truth becomes three label sets (``aegir labels from-masks``: panel
polygons, one box per array, one point per array), imported into a temporary lakehouse; the tiles are catalogued
with their truth. One ``training_data`` table per label set is built through the lakehouse with the offline
backend (``--whole-images``): each row holds the generated mask and, in its own column, the truth. The same recipe
(U-Net / ResNet-18, the same wall-clock budget, the same spatial split: whole-image rows share their centroids, so
the S2-cell split puts every tile in the same split for every table) trains on the generated masks of each set and
on the truth; every model is scored on the test split's tiles (cells never used for training or model selection)
against the ground truth. Printed: the generated masks' IoU with the truth, the test pixel IoU per seed, mean and
spread, and the ratio to the truth-trained model (goal ≥ 0.95 boxes and polygons, ≥ 0.85 points).

**Join speed.** All shared label sets (``aegir labels import-samples``: 15,458 labels) against a catalog of
footprints, one per level-15 S2 cell holding a label centroid (padded with the neighbouring cells up to ≥ 10,000):
the seconds of the join (label cells + the DuckDB spatial join; goal < 10 s) and of the whole prompt conversion.

    python bench/label_to_model.py [--minutes 4] [--seeds 0,1] [--threads 2] [--skip-training]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from aegir.config import Settings  # noqa: E402
from aegir.pipelines import lakehouse_build  # noqa: E402
from aegir.pipelines.imagery import join_labels_to_imagery, register_imagery  # noqa: E402
from aegir.pipelines.labels import import_labels, labels_from_masks  # noqa: E402
from aegir.pipelines.predict import object_and_pixel_scores  # noqa: E402
from aegir.store import ducklake, lance_io  # noqa: E402
from aegir.store.chip_codec import decode_chip  # noqa: E402
from aegir.utils import s2geometry  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
JIANG = SHARED / "vhr" / "jiang_pv01"
KINDS = ("polygons", "boxes", "points")
GOALS = {"polygons": 0.95, "boxes": 0.95, "points": 0.85}


def _settings(work: Path) -> Settings:
    return Settings(lancedb_root=str(work / "lancedb"), ducklake_catalog=str(work / "lake" / "catalog.ducklake"),
                    ducklake_data_path=str(work / "lake" / "files") + "/", sample_data_dir=SHARED)


def mask_agreement(uri: str, settings: Settings) -> float:
    """Mean IoU of a table's generated masks with its truth masks (rows with PV truth)."""
    rows = lance_io.open_training_table(uri, settings.lancedb_root, create=False).to_arrow().to_pylist()
    ious = []
    for row in rows:
        meta = row["metadata"]
        generated = decode_chip(row["generated_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        truth = decode_chip(row["truth_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        if truth.any():
            ious.append((generated & truth).sum() / (generated | truth).sum())
    return float(np.mean(ious))


def train_and_score(uri: str, settings: Settings, target: str, seed: int, minutes: float, threads: int,
                    out: Path) -> dict:
    from aegir.training.config import TrainConfig
    from aegir.training.train import run_training

    config = TrainConfig(max_epochs=200, max_minutes=minutes, threads=threads, accelerator="cpu", wandb=False,
                         progress_bar=False, seed=seed, mask_target=target)
    result = run_training(uri, config, out, settings.lancedb_root)
    split = json.loads((out / "split.json").read_text())["uuids"]
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    sources = {r["uuid"]: Path(r["source"]).stem for r in table.to_lance().to_table(
        columns={"uuid": "uuid", "source": "metadata.source_file"}).to_pylist()}
    test = [sources[u] for u in split["test"]]
    scores = object_and_pixel_scores(result.best_checkpoint, JIANG / "images", JIANG / "masks", test, device="cpu")
    return {"pixel_iou": scores["pixel_iou"], "mean_iou": scores["mean_iou"], "test_tiles": len(test),
            "epochs": result.epochs, "test_stems": test}


def label_to_model(work: Path, settings: Settings, minutes: float, seeds: list[int], threads: int,
                   skip_training: bool) -> dict:
    made = labels_from_masks(JIANG / "images", JIANG / "masks", work / "labels", "jiang")
    for kind in KINDS:
        import_labels(settings, made.paths[kind], f"jiang_{kind}")
    register_imagery(settings, [JIANG / "images"], "jiang_pv01", truth_masks=JIANG / "masks")
    tables, agreement, build_seconds = {}, {}, {}
    for kind in KINDS:
        uri = str(work / "lancedb" / f"jiang_{kind}")
        started = time.perf_counter()
        lakehouse_build.build_training_from_lakehouse(settings, ducklake.LabelQuery(datasets=(f"jiang_{kind}",)),
                                                      uri, chip_size=None)
        build_seconds[kind] = round(time.perf_counter() - started, 1)
        tables[kind], agreement[kind] = uri, round(mask_agreement(uri, settings), 4)
    out = {"components": made.counts, "mask_iou_vs_truth": agreement, "build_seconds": build_seconds}
    if skip_training:
        return out
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        runs.setdefault("truth", []).append(train_and_score(tables["polygons"], settings, "truth", seed, minutes,
                                                            threads, work / "runs" / f"truth_{seed}"))
        for kind in KINDS:
            runs.setdefault(kind, []).append(train_and_score(tables[kind], settings, "generated", seed, minutes,
                                                             threads, work / "runs" / f"{kind}_{seed}"))
    same_split = len({tuple(r["test_stems"]) for rs in runs.values() for r in rs}) == 1
    summary = {}
    for name, rs in runs.items():
        ious = [r["pixel_iou"] for r in rs]
        summary[name] = {"test_pixel_iou": [round(v, 4) for v in ious], "mean": round(statistics.mean(ious), 4),
                         "sd": round(statistics.stdev(ious), 4) if len(ious) > 1 else None,
                         "epochs": [r["epochs"] for r in rs], "test_tiles": rs[0]["test_tiles"]}
    truth = summary["truth"]["mean"]
    for kind in KINDS:
        per_seed = [v / t for v, t in zip(summary[kind]["test_pixel_iou"], summary["truth"]["test_pixel_iou"])]
        summary[kind]["ratio_to_truth"] = round(summary[kind]["mean"] / truth, 4)
        summary[kind]["ratio_per_seed"] = [round(r, 4) for r in per_seed]
        summary[kind]["goal"] = GOALS[kind]
    return out | {"same_test_split_everywhere": same_split, "minutes_per_model": minutes, "seeds": seeds,
                  "models": summary}


def synthetic_catalog(settings: Settings, labels: pa.Table, minimum: int = 10_000) -> int:
    """One footprint per level-15 cell holding a label centroid, plus neighbours until ≥ ``minimum``."""
    tokens = set(s2geometry.s2_tokens(labels["centroid_lat"].to_numpy(), labels["centroid_lon"].to_numpy(), 15))
    if len(tokens) < minimum:  # pad with the cells beside each label cell (a denser imagery catalog)
        for token in list(tokens):
            polygon = s2geometry.s2_cell_polygon(token)
            ring = shapely.get_coordinates(polygon.exterior if hasattr(polygon, "exterior") else polygon)
            tokens.update(s2geometry.s2_tokens(ring[:, 1] + 0.003, ring[:, 0] + 0.003, 15))
            if len(tokens) >= minimum:
                break
    tokens = sorted(tokens)
    footprints = [s2geometry.s2_cell_polygon(t) for t in tokens]
    now = dt.datetime.now(dt.timezone.utc)
    centroids = shapely.centroid(np.array(footprints, dtype=object))
    bounds = shapely.bounds(np.array(footprints, dtype=object))  # a 512² grid in EPSG:4326 over each cell
    transforms = [[(b[2] - b[0]) / 512, 0.0, b[0], 0.0, -(b[3] - b[1]) / 512, b[3]] for b in bounds]
    rows = pa.table({
        "image_id": [f"s2cell-{t}" for t in tokens], "uri": [f"synthetic://s2/{t}" for t in tokens],
        "dataset": ["synthetic"] * len(tokens), "footprint_wkb": pa.array(shapely.to_wkb(footprints), pa.binary()),
        "crs": ["EPSG:4326"] * len(tokens), "transform": pa.array(transforms, pa.list_(pa.float64())), "width": pa.array([512] * len(tokens), pa.int32()),
        "height": pa.array([512] * len(tokens), pa.int32()), "georeferenced": [True] * len(tokens),
        "grid_convention": ["file"] * len(tokens),
        "centroid_lon": shapely.get_x(centroids), "centroid_lat": shapely.get_y(centroids),
        "s2_cover": pa.array([[str(p)] for p in s2geometry.parent_tokens(np.array(tokens), 12)],
                             pa.list_(pa.string())),
        "registered_at": pa.array([now] * len(tokens), pa.timestamp("us", tz="UTC")),
    })
    con = ducklake.connect(settings)
    try:
        ducklake.write_imagery(con, settings, rows, pa.table({}))
    finally:
        con.close()
    return len(tokens)


def join_speed(work: Path) -> dict:
    from aegir.pipelines.labels import read_labels
    from aegir.sample_data import SAMPLE_LABEL_SETS

    settings = _settings(work / "join")
    for item in SAMPLE_LABEL_SETS:
        import_labels(settings, item.path(SHARED), item.dataset, doi=item.doi)
    labels = read_labels(settings, ducklake.LabelQuery())
    footprints = synthetic_catalog(settings, labels)
    started = time.perf_counter()
    joined = join_labels_to_imagery(settings, ducklake.LabelQuery())
    total = time.perf_counter() - started
    return {"labels": joined.stats["labels"], "footprints": footprints, "pairs": joined.stats["pairs"],
            "prompts": joined.prompts.num_rows, "join_seconds": joined.stats["join_seconds"],
            "join_and_prompts_seconds": round(total, 2), "labels_without_imagery": joined.without_imagery,
            "goal_seconds": 10.0, "pass": joined.stats["join_seconds"] < 10.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="wall-clock budget per model")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-join", action="store_true")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="aegir-label-to-model-"))
    result = {}
    if not args.skip_join:
        result["join"] = join_speed(work)
        print(json.dumps({"join": result["join"]}, indent=1), flush=True)
    settings = _settings(work)
    result["label_to_model"] = label_to_model(work, settings, args.minutes, [int(s) for s in args.seeds.split(",")],
                                              args.threads, args.skip_training)
    print(json.dumps(result, indent=1, default=str))
    models = result["label_to_model"].get("models")
    if models:
        print(f"\n{'trained on':12}{'mask IoU vs truth':>18}{'test pixel IoU (seeds)':>28}{'mean ± sd':>16}"
              f"{'ratio':>8}{'goal':>6}")
        for name in ("truth", *KINDS):
            m = models[name]
            agreement = result["label_to_model"]["mask_iou_vs_truth"].get(name, 1.0)
            sd = f" ± {m['sd']:.3f}" if m["sd"] is not None else ""
            ratio = f"{m['ratio_to_truth']:.3f}" if "ratio_to_truth" in m else "1"
            goal = f"{m['goal']:.2f}" if "goal" in m else ""
            print(f"{name:12}{agreement:>18.3f}{', '.join(f'{v:.3f}' for v in m['test_pixel_iou']):>28}"
                  f"{m['mean']:>9.3f}{sd:<7}{ratio:>8}{goal:>6}")


if __name__ == "__main__":
    main()

# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Inference over an S2 grid, validation and the flywheel's gate on the Austin tiles
#
# Three things a model meets after training, on a 3 × 4 block of the real Austin tiles (Google Static Maps
# zoom 19, ~0.26 m, their grid computed from the file names):
#
# **train** (a short CPU run on the Jiang PV01 seed, scored on the seed tiles of its test cells) → **infer** (the
# region covered by level-14 S2 cells, a resumable plan in DuckLake, overlapping tiles blended, detections as
# GeoParquet and in the lakehouse table `predicted_pv`) → **validate** (accept / reject / needs review on score
# and shape, each with its reasons) → **the flywheel's gate** (the model's test-time views per tile → candidate
# components → evidence → accept / reject with the first failed check → the pseudo-label windows the next round
# may train on).
#
# We look at the result the way a reviewer would: the detections on a map coloured by decision (folium: pan to
# a roof, click a polygon for its score and reasons; a PNG of the same over the imagery below it), why
# detections were rejected, and which candidates the gate lets through.
#
# No Sentinel-2 scene in the shared data covers Austin, so validation here decides on score and shape
# (`require_msi = False`); with a scene, the spectral evidence (NDVI / MNDWI / the PV indices, SCL or the
# cloud-shadow model) joins the reasons — `aegir.dataflows.validation` takes it as an input.

# %%
import json
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

import folium
import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Image, display

from aegir.config import load_settings
from aegir.dataflows import validation
from aegir.dataflows.pseudo_labels import EVIDENCE, PseudoLabelGate
from aegir.masks import get_backend
from aegir.pipelines import run_stage
from aegir.pipelines.dataset import build_dataset_from_images
from aegir.pipelines.flywheel import load_flywheel_config
from aegir.pipelines.predict import load_rgb_model, object_and_pixel_scores
from aegir.pipelines.quicklook import candidate_quicklooks
from aegir.pipelines.region import infer_region
from aegir.store import ducklake, lance_io, mask_files, region_files
from aegir.store.lance_io import MASK_IGNORE
from aegir.training.config import TrainConfig
from aegir.training.predictor import view_probabilities
from aegir.training.train import run_training
from aegir.utils import s2geometry
from aegir.utils.notebook import notebook_workspace, save_results, show_figure

NAME = "05_inference_and_validation_loop"
WORK = notebook_workspace(NAME)  # $NOTEBOOK_WORKDIR/<name>, else ./_work/<name>

base = load_settings()
settings = base.replace(lancedb_root=str(WORK / "lancedb"),
                        ducklake_catalog=str(WORK / "ducklake" / "catalog.ducklake"),
                        ducklake_data_path=str(WORK / "ducklake" / "files") + "/")
DATA = Path(settings.sample_data_dir)
JIANG = DATA / "vhr" / "jiang_pv01"
AUSTIN = DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"
RESULTS: dict = {}
STARTED = time.perf_counter()


def show(figure, name: str) -> None:
    """Save a figure as ``WORK/<name>.png`` and display that PNG (a static result, no browser needed)."""
    show_figure(figure, WORK / f"{name}.png")


# the region: a contiguous 3 x 4 block of the 45 Austin tiles (rows of latitude x columns of longitude)
REGION = WORK / "austin_block"
REGION.mkdir()
lats, lons = ("30.299907", "30.301307", "30.302707"), ("-97.70031", "-97.70171", "-97.70311", "-97.70451")
for lat in lats:
    for lon in lons:
        (REGION / f"{lat}_{lon}.png").symlink_to(AUSTIN / f"{lat}_{lon}.png")
print(f"python {sys.executable}\nworkspace {WORK}\nregion: {len(list(REGION.iterdir()))} tiles from {AUSTIN}")

# %% [markdown]
# ## A short model on the Jiang PV01 seed
#
# The 60 seed tiles (0.1 m UAV imagery, ground-truth masks) into `training_data`, split by S2 cell (train / val /
# test never share a cell), then 12 epochs on random 128 px crops, each chip normalised by its own statistics and
# zoomed out by up to 3× (0.1 m → ~0.3 m, the Austin resolution). The epoch count is the budget: the wall-clock
# cap (`max_minutes`) is only a guard, set loosely because a 1.5-minute cap on a busy 2-core machine stops after
# 3 epochs with a model that finds nothing (held-out pixel IoU ~0.01; 12 epochs: ~0.8). The held-out score is the
# model on the seed tiles of the test cells, against their truth.

# %%
uri = str(Path(settings.lancedb_root) / "training_data")
built = build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", uri, "jiang_pv01")
train_config = TrainConfig(max_minutes=8.0, max_epochs=12, crop_size=128, warmup_epochs=1, lr=2e-3,
                           threads=min(2, os.cpu_count() or 1), wandb=False, progress_bar=False, accelerator="cpu",
                           normalization="per_image", scale_range=[0.33, 1.0])
trained = run_training(uri, train_config, WORK / "train", settings.lancedb_root)
checkpoint = trained.best_checkpoint
print(f"training_data v{built.version}: {built.inserted} rows inserted, {len(built.skipped)} skipped; "
      f"{trained.epochs} epochs in {trained.seconds:.0f} s → {Path(checkpoint).name}")

# %%
split = json.loads((Path(checkpoint).parent / "split.json").read_text())
table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
rows = lance_io.read_version(table, trained.data_version, {"uuid": "uuid", "sample_id": "metadata.sample_id"})
test_uuids = set(split["uuids"]["test"])
test_stems = sorted(r["sample_id"] for r in rows.to_pylist() if r["uuid"] in test_uuids)
held_out = object_and_pixel_scores(checkpoint, JIANG / "images", JIANG / "masks", test_stems, device="cpu")
RESULTS["held_out"] = {"split": trained.split_counts, "epochs": trained.epochs,
                       "val_iou": trained.best_metrics.get("val/iou"), "test_tiles": held_out["images"],
                       "pixel_iou": held_out["pixel_iou"], "mean_iou": held_out["mean_iou"],
                       "object_f1": held_out["object"]["f1"]}
display(pd.Series(trained.split_counts, name="seed tiles").to_frame().T)
pd.DataFrame({"model on held-out seed tiles": {
    "tiles": held_out["images"], "pixel IoU": held_out["pixel_iou"], "mean IoU": held_out["mean_iou"],
    "object precision @ IoU 0.5": held_out["object"]["precision"],
    "object recall @ IoU 0.5": held_out["object"]["recall"], "object F1 @ IoU 0.5": held_out["object"]["f1"]}}).T.round(3)

# %% [markdown]
# ## Region inference: the S2 grid plan and the detections
#
# `infer_region` covers the tiles' footprint with level-14 S2 cells, records the plan in DuckLake (`grid_plan`:
# cell token, priority, status) and runs one cell at a time; the detections are in `predicted_pv` and in
# `infer/detections.parquet` (EPSG:4326, geodesic area, score, the cell that holds the centroid, the checkpoint
# and data version that made them). Each is then validated on score and shape (score ≥ 0.6, area ≥ 2 m²,
# rectangularity ≥ 0.35 — below it the detection goes to review).

# %%
report = infer_region(settings, checkpoint, WORK / "infer", tiles_dir=REGION, pv_threshold=0.5, plan_level=14)
con = ducklake.connect(settings)
try:
    plan = ducklake.read_grid_plan(con, settings, report.plan_id).to_pandas()
    in_lake = ducklake.read_predictions(con, settings, report.plan_id).num_rows
finally:
    con.close()
plan_cells = gpd.GeoDataFrame(plan, geometry=[s2geometry.s2_cell_polygon(t) for t in plan.cell_token],
                              crs="EPSG:4326")
detections = gpd.read_parquet(report.detections_parquet)

thresholds = validation.ValidationThresholds(min_score=0.6, min_area_m2=2.0, min_rectangularity=0.35,
                                             require_msi=False)
n = len(detections)
shape = validation.shape_evidence(list(detections.geometry)) if n else {"area_m2": np.zeros(0),
                                                                        "rectangularity": np.zeros(0)}
no_msi = {name: np.full(n, np.nan) for name in validation.INDEX_NAMES}  # no Sentinel-2 scene over Austin
decisions = validation.validation_decisions(detections["score"].to_numpy(), no_msi, np.full(n, np.nan), shape,
                                            thresholds).to_pandas()
detections = detections.join(decisions[["decision", "reasons", "area_m2", "rectangularity"]]
                             .rename(columns={"area_m2": "area_m2_validated"}))
detections["why"] = detections.reasons.map(lambda r: "; ".join(r) if len(r) else "passes every check")
print(f"plan {report.plan_id}: {report.cells} level-14 cells, statuses {plan.status.value_counts().to_dict()}")
print(f"{len(detections)} detections ({in_lake} rows in predicted_pv), {report.chips} model tiles in "
      f"{report.seconds:.0f} s")
counts = detections.decision.value_counts()
RESULTS["detections"] = {"total": len(detections), "by_decision": {k: int(v) for k, v in counts.items()},
                         "plan_cells": len(plan), "predicted_pv_rows": in_lake}
display(plan[["cell_token", "priority", "status"]])
counts.to_frame("detections")

# %% [markdown]
# **Why rejected / sent to review.** Each reason is a check with its measured value; grouped by check:

# %%
def check_name(reason: str) -> str:
    return reason.split(" ")[0].split(":")[0].replace("irregular", "irregular shape")


reason_counts = Counter(check_name(r) for reasons in detections.reasons for r in reasons)
RESULTS["detections"]["reasons"] = dict(reason_counts)
display(pd.Series(reason_counts, name="detections", dtype=int).sort_values(ascending=False).to_frame())
columns = ["detection_id", "score", "area_m2", "rectangularity", "decision", "why"]
examples = pd.concat([detections[detections.decision == d].sort_values("score", ascending=False).head(3)
                      for d in ("accept", "reject", "needs_review")])
examples[columns].round(3)

# %% [markdown]
# ## On a map
#
# Detections coloured by decision (green accept, red reject, orange review; click for score and reasons),
# the level-14 plan cells and the tile footprints. The OpenStreetMap background needs a network; the vectors
# are in the notebook.

# %%
COLOURS = {"accept": "#2ca02c", "reject": "#d62728", "needs_review": "#ff7f0e"}
tiles, _ = region_files.tile_index(REGION)
footprints = gpd.GeoDataFrame({"tile": [Path(t.path).name for t in tiles]}, geometry=[t.footprint for t in tiles],
                              crs="EPSG:4326")
fmap = folium.Map(tiles="OpenStreetMap", control_scale=True, max_zoom=21)
folium.GeoJson(footprints, name="tiles", tooltip=folium.GeoJsonTooltip(["tile"]),
               style_function=lambda _: {"color": "#555555", "weight": 1, "fill": False}).add_to(fmap)
folium.GeoJson(plan_cells[["cell_token", "priority", "status", "geometry"]], name="S2 level-14 plan cells",
               tooltip=folium.GeoJsonTooltip(["cell_token", "status"]),
               style_function=lambda _: {"color": "black", "weight": 2, "fill": False, "dashArray": "6"}).add_to(fmap)
shown = detections[["detection_id", "score", "area_m2", "decision", "why", "geometry"]].copy()
shown["score"] = shown.score.round(3)
shown["area_m2"] = shown.area_m2.round(1)
shown["geometry"] = shown.geometry.simplify(2e-6)  # ~0.2 m: drops the pixel staircase, keeps the map light
for decision, group in shown.groupby("decision"):
    folium.GeoJson(group, name=f"{decision} ({len(group)})",
                   style_function=lambda _, c=COLOURS[decision]: {"color": c, "weight": 1.5, "fillOpacity": 0.45},
                   popup=folium.GeoJsonPopup(["detection_id", "score", "area_m2", "decision", "why"])).add_to(fmap)
folium.LayerControl(collapsed=False).add_to(fmap)
minx, miny, maxx, maxy = footprints.total_bounds
fmap.fit_bounds([[miny, minx], [maxy, maxx]])
fmap.save(WORK / "detections_map.html")
fmap

# %% [markdown]
# Static fallback: the same detections over the tiles themselves (each tile drawn on its Web-Mercator grid).

# %%
figure, ax = plt.subplots(figsize=(11, 8))
for tile in tiles:
    chip = mask_files.read_image_chip(tile.path)
    left, bottom, right, top = chip.bounds
    ax.imshow(np.moveaxis(chip.rgb8(), 0, -1), extent=(left, right, bottom, top))
plan_cells.to_crs(tiles[0].crs).boundary.plot(ax=ax, color="black", linewidth=1.2, linestyle="--")
for decision, group in detections.to_crs(tiles[0].crs).groupby("decision"):
    group.plot(ax=ax, facecolor=COLOURS[decision], edgecolor=COLOURS[decision], alpha=0.5,
               label=f"{decision} ({len(group)})")
x0, y0, x1, y1 = footprints.to_crs(tiles[0].crs).total_bounds
ax.set(xlim=(x0, x1), ylim=(y0, y1), title="Austin block: detections by validation decision (EPSG:3857)")
ax.legend(loc="lower right")
ax.axis("off")
show(figure, "detections_over_tiles")

# %% [markdown]
# ## The flywheel's gate
#
# This is what `aegir flywheel`'s **detect** step does on its target images every round (rounds are data →
# train → evaluate → detect; the next round's data step turns the admitted windows into `training_data` rows).
# Per tile: the model's PV probability under two test-time views (the image and its transpose, mapped back) →
# candidates (8-connected components of the mean probability ≥ 0.5, at least 40 px) → evidence per candidate,
# none of it from ground truth (score, agreement of the views, IoU with the offline Mask Factory's mask drawn from
# the candidate's box, excess green, area, rectangularity) → `accept` or `reject:<first failed check>` → the
# windows (256² px) this tile may contribute. A window's mask carries three values: **1** on accepted
# components, **0** where every view keeps the probability below 0.2, and **ignore** (`MASK_IGNORE` = 2:
# rejected candidates and the uncertain band around every candidate, never trained on or scored). A window is a
# **positive** pseudo-label when it holds an accepted component, a **negative** when it holds none and at most
# 2 % of it is ignored; anything else is left out. The thresholds are the flywheel's defaults
# (`[flywheel.gate]` in `aegir/defaults/flywheel.toml`).

# %%
flywheel = load_flywheel_config()
gate = PseudoLabelGate(**flywheel.gate)
model = load_rgb_model(checkpoint, "cpu")
mask_factory = get_backend("offline")
panels, candidates, windows, window_masks = [], [], [], []
for tile in tiles:
    chip = mask_files.read_image_chip(tile.path)
    image = chip.rgb8()
    views = view_probabilities(image, model.predict_proba, (0, 7))
    found = run_stage("pseudo_labels", ["candidate_labels", "candidate_evidence", "candidate_decisions",
                                        "pseudo_windows"],
                      {"image": image, "view_probabilities": views, "mask_factory": mask_factory, "gate": gate,
                       "window_px": 256})
    name = Path(tile.path).stem
    labels, verdicts, evidence = found["candidate_labels"], found["candidate_decisions"], found["candidate_evidence"]
    panels.append((name, chip, labels, verdicts))
    candidates += [{"tile": name, "component": k + 1, "decision": d, **{e: float(evidence[e][k]) for e in EVIDENCE}}
                   for k, d in enumerate(verdicts)]
    accepted_ids = [k + 1 for k, d in enumerate(verdicts) if d == "accept"]
    for window in found["pseudo_windows"]:
        inside = labels[window.row:window.row + window.size, window.col:window.col + window.size]
        windows.append({"tile": name, "col": window.col, "row": window.row, "size": window.size,
                        "kind": window.kind, "confidence": round(window.confidence, 3),
                        "components": window.components,
                        "accepted_inside": int(np.isin(np.unique(inside), accepted_ids).sum()),
                        "values": sorted(int(v) for v in np.unique(window.mask)),
                        "ignored_share": round(float((window.mask == MASK_IGNORE).mean()), 4)})
        window_masks.append((chip, window))
candidates = pd.DataFrame(candidates, columns=["tile", "component", "decision", *EVIDENCE])
windows = pd.DataFrame(windows, columns=["tile", "col", "row", "size", "kind", "confidence", "components",
                                         "accepted_inside", "values", "ignored_share"])
by_reason = candidates.decision.value_counts()
admitted = windows.kind.value_counts()
RESULTS["gate"] = {"tiles": len(tiles), "thresholds": flywheel.gate, "candidates": len(candidates),
                   "accepted": int((candidates.decision == "accept").sum()),
                   "by_reason": {k: int(v) for k, v in by_reason.items()},
                   "admitted": {kind: int(admitted.get(kind, 0)) for kind in ("positive", "negative")},
                   "windows": windows[["tile", "kind", "components", "accepted_inside", "values"]].to_dict("records")}
print(f"{len(candidates)} candidates on {len(tiles)} tiles; windows admitted: "
      f"{RESULTS['gate']['admitted']['positive']} positive, {RESULTS['gate']['admitted']['negative']} negative")
by_reason.to_frame("candidates")

# %% [markdown]
# The evidence of the most confident accepted candidates and of the most confident rejected one per reason
# (the reason is the first check that failed; the Mask Factory is asked only when the cheap checks pass, so a
# candidate rejected earlier has no `mask_factory_iou`):

# %%
evidence_examples = pd.concat([
    candidates[candidates.decision == "accept"].sort_values("score", ascending=False).head(3),
    candidates[candidates.decision != "accept"].sort_values("score", ascending=False).groupby("decision").head(1)])
evidence_examples.round(3)

# %% [markdown]
# The admitted windows (a tile can give several; positives carry the mean score of their accepted components as
# confidence, negatives 1 − the highest probability inside):

# %%
display(windows.drop(columns=["values"]).sort_values(["kind", "confidence"], ascending=[False, False]).head(12))
window_examples = ([w for w in window_masks if w[1].kind == "positive"][:4]
                   + [w for w in window_masks if w[1].kind == "negative"][:2])
if window_examples:
    figure, axes = plt.subplots(2, len(window_examples), figsize=(2.6 * len(window_examples), 5.4), squeeze=False)
    palette = np.array([[0, 0, 0], [255, 215, 0], [128, 128, 128]], np.uint8)  # 0 black, 1 gold, ignore grey
    for (chip, window), top, bottom in zip(window_examples, axes[0], axes[1]):
        crop = chip.rgb8()[:, window.row:window.row + window.size, window.col:window.col + window.size]
        top.imshow(np.moveaxis(crop, 0, -1))
        top.set_title(f"{window.kind} ({window.confidence:.2f})", fontsize=9)
        bottom.imshow(palette[np.minimum(window.mask, 2)])
        for a in (top, bottom):
            a.axis("off")
    figure.suptitle("admitted windows: image | pseudo-label (gold 1, black 0, grey ignore)")
    show(figure, "admitted_windows")

# %% [markdown]
# Every tile of the block with its candidates outlined by the gate's decision (green accept, red reject):

# %%
sheet = candidate_quicklooks(panels, WORK / "gate")
display(Image(filename=sheet["contact_sheet"]))

# %% [markdown]
# ## Reading the results
#
# * A model trained for 12 short epochs on 40 Chinese UAV tiles (0.1 m) is run on Texan aerial imagery at
#   ~0.26 m: a domain and resolution shift, and the map shows it — besides real arrays it marks large flat roofs
#   and paving as PV. Score and shape alone reject the small fragments and low-score blobs (reasons above) but
#   accept confident, rectangular false positives. That is what the other evidence is for: spectral indices
#   where a Sentinel-2 scene covers the region, and a person for the `needs_review` queue.
# * The flywheel's gate is much stricter than validation, because what it admits is trained on: a candidate must
#   also look the same under the transposed view, be matched by a model-free Mask Factory mask drawn from its box,
#   not be green, and be rectangular enough. On this block it accepts only a small share of the candidates (in
#   the test run 32 of 601; most fail on score or on the Mask Factory, see the table by reason), and the contact
#   sheet shows that strictness is not the same as correctness: besides small patches on residential roofs
#   (some of them panels) it passes a pool and dark, shaded roof patches, while the big arrays on the flat roofs fail because their
#   component runs into the roof around them. Negative windows are rare here: a busy urban 256² window seldom
#   has ≤ 2 % of pixels where the model is unsure. Whether such windows help is what `aegir flywheel`
#   measures round by round (seed-test and target IoU, transfer recall / precision); this notebook shows one
#   pass of the gate, not that outcome.
# * Everything here is resumable and keyed: re-running inference on the same inputs reuses the plan in DuckLake
#   and replaces (never duplicates) a cell's `predicted_pv` rows; the seed build upserts by uuid.

# %%
RESULTS["seconds"] = round(time.perf_counter() - STARTED, 1)
save_results(RESULTS, WORK)
print(json.dumps({k: v for k, v in RESULTS.items() if k != "gate"} | {
    "gate": {k: v for k, v in RESULTS["gate"].items() if k != "windows"}}, indent=1, default=str))

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
# # 04 · YOLO-seg baseline: export, check, train, evaluate
#
# An instance-segmentation baseline next to the SMP models: the **same** `training_data` rows, table version
# and S2-cell split as `aegir train` (`aegir yolo export`), written in the Ultralytics layout (PNG chips,
# one polygon per mask component, `data.yaml`), opened by Ultralytics' own dataset checker (`aegir yolo check`),
# then trained from the YOLO11n-seg architecture YAML (random init, no download) and evaluated two ways:
# Ultralytics' mask mAP, and the pixel IoU of the union of its instance masks against the stored masks — the
# measure the SMP models report, so the two families can be compared on one scale.
#
# Needs the `yolo` extra plus `pip install --no-deps ultralytics==8.4.190` (AGPL-3.0; `--no-deps` keeps its
# `opencv-python` from shadowing `opencv-python-headless`). A CPU budget of a minute or so is far too short for
# YOLO from scratch: the numbers below show the pipeline and the curves starting to move; the 300-epoch run
# is `bench/yolo_baseline.py` (test mask mAP50 0.561, pixel IoU 0.753).

# %%
import json
import os
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image as PILImage

from aegir.utils.notebook import notebook_workspace, save_results, show_figure  # noqa: E402

NAME = "04_yolo_baseline_prep_and_eval"
WORK = notebook_workspace(NAME)  # $NOTEBOOK_WORKDIR/<name>, else ./_work/<name>
os.environ["YOLO_CONFIG_DIR"] = str(WORK / "ultralytics_config")  # Ultralytics' settings stay in the workspace
os.environ.setdefault("YOLO_VERBOSE", "False")  # warnings and errors only: no per-batch progress bars in the notebook

from aegir.config import load_settings  # noqa: E402
from aegir.pipelines.dataset import build_dataset_from_images  # noqa: E402
from aegir.store import lance_io, yolo_files  # noqa: E402
from aegir.store.chip_codec import decode_chip  # noqa: E402
from aegir.training import yolo_baseline as yb  # noqa: E402
from aegir.training.config import TrainConfig  # noqa: E402
from aegir.utils.mask_metrics import mask_set_metrics  # noqa: E402
from aegir.utils.quicklook import mask_overlay  # noqa: E402

base = load_settings()
settings = base.replace(lancedb_root=str(WORK / "lancedb"),
                        ducklake_catalog=str(WORK / "ducklake" / "catalog.ducklake"),
                        ducklake_data_path=str(WORK / "ducklake" / "files") + "/")
DATA = Path(settings.sample_data_dir)
JIANG = DATA / "vhr" / "jiang_pv01"
URI = str(WORK / "lancedb" / "training_data")
RESULTS: dict = {}
STARTED = time.perf_counter()


def show(figure, name: str) -> None:
    """Save a figure as ``WORK/<name>.png`` and display that PNG (a static result, no browser needed)."""
    show_figure(figure, WORK / f"{name}.png")


print(f"python {sys.executable}\nworkspace {WORK}\nshared data {DATA}")

# %% [markdown]
# ## Export the split (`aegir yolo export`)

# %%
build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", URI, "jiang_pv01")
config = TrainConfig()  # the default split: level-15 S2 cells, val 0.2 / test 0.15 → 40 / 10 / 10 tiles
export = yb.export_yolo_dataset(URI, WORK / "yolo", config, settings.lancedb_root)
EXPORT = Path(export["out_dir"])
print((EXPORT / "data.yaml").read_text())
pd.DataFrame({k: export[k] for k in ("counts", "objects", "empty_labels")})

# %% [markdown]
# **Does the export say what the table says?** Each label file's polygons rasterised back
# (`polygons_to_mask`) against the stored mask of its row: pixel IoU over every exported chip. Holes are
# filled and single-pixel specks dropped by design (YOLO polygons have no holes), so this is slightly below 1.

# %%
table = lance_io.open_training_table(URI, settings.lancedb_root, create=False)
stored = {}
for row in table.to_lance().to_table(columns=["uuid", "truth_mask", "metadata"]).to_pylist():
    meta = row["metadata"]
    stored[row["uuid"]] = decode_chip(row["truth_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
pairs = [(label.stem, yb.polygons_to_mask(yolo_files.read_label_polygons(label), stored[label.stem].shape) > 0,
          stored[label.stem]) for label in sorted(EXPORT.glob("labels/*/*.txt"))]
round_trip = mask_set_metrics(pairs)
RESULTS["export"] = {"counts": export["counts"], "objects": export["objects"],
                     "round_trip_pixel_iou": round_trip["pixel_iou"], "dropped_polygons": export["dropped_polygons"]}
print(f"label polygons vs stored masks: pixel IoU {round_trip['pixel_iou']:.4f} over {round_trip['images']} chips, "
      f"{export['dropped_polygons']} specks dropped")

# %%
train_labels = sorted((EXPORT / "labels" / "train").glob("*.txt"), key=lambda p: -len(p.read_text()))[:4]
figure, axes = plt.subplots(1, len(train_labels), figsize=(3.3 * len(train_labels), 3.5))
for ax, label in zip(axes, train_labels):
    rgb = np.asarray(PILImage.open(EXPORT / "images" / "train" / f"{label.stem}.png").convert("RGB"))
    ax.imshow(rgb)
    for polygon in yolo_files.read_label_polygons(label):
        xy = polygon * np.array([rgb.shape[1], rgb.shape[0]])
        ax.fill(xy[:, 0], xy[:, 1], facecolor="magenta", alpha=0.35, edgecolor="yellow", linewidth=1)
    ax.set_title(f"{label.stem[:8]}…: {len(yolo_files.read_label_polygons(label))} polygons", fontsize=8)
    ax.axis("off")
figure.suptitle("exported train chips with their YOLO polygon labels", fontsize=10)
show(figure, "yolo_labels")

# %% [markdown]
# ## Check it the way Ultralytics reads it (`aegir yolo check`)
#
# `check_det_dataset` (the `data.yaml` checker), the per-file label verifier on every image / label pair, and a
# `YOLODataset(task="segment")` per split. `ok` means no missing or corrupt labels and every row a polygon.

# %%
check = yb.check_yolo_dataset(export["data_yaml"])
RESULTS["check_ok"] = check["ok"]
print("ok:", check["ok"], "| classes:", check["names"])
pd.DataFrame(check["splits"]).T[["images", "found", "missing", "empty", "corrupt", "instances", "segments",
                                 "dataset_labels", "mask_shape"]]

# %% [markdown]
# ## Train (`aegir yolo train`), from the architecture YAML
#
# 60 epochs on chips downsampled to 128 px (about a minute on two cores; at 256 px the same minute buys only 20
# epochs, after which the from-scratch model still scores nothing); the best weights are then validated on the
# val and test splits. Ultralytics writes its per-epoch `results.csv`: the curves below are read from it.

# %%
yolo = yb.train_yolo_baseline(export["data_yaml"], WORK / "yolo_runs", epochs=60, imgsz=128, batch=8,
                              workers=0, splits=("val", "test"))
print(f"{yolo['epochs']} epochs in {yolo['seconds']} s → {yolo['weights']}")
maps = pd.DataFrame(yolo["metrics"]).T
maps.round(3)

# %%
log = pd.read_csv(Path(yolo["save_dir"]) / "results.csv")
log.columns = [c.strip() for c in log.columns]
figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
for column in ("train/seg_loss", "train/box_loss", "val/seg_loss", "val/box_loss"):
    if column in log:
        left.plot(log["epoch"], log[column], marker=".", label=column)
left.set(xlabel="epoch", ylabel="loss", title="losses (results.csv)")
left.legend(fontsize=8)
for column in ("metrics/mAP50(M)", "metrics/mAP50-95(M)", "metrics/mAP50(B)"):
    if column in log:
        right.plot(log["epoch"], log[column], marker=".", label=column)
right.set(xlabel="epoch", ylabel="mAP on val", ylim=(0, 1), title="validation mAP")
right.legend(fontsize=8)
show(figure, "yolo_curves")

# %% [markdown]
# ## Pixel IoU against the stored masks (the SMP measure)
#
# The best weights predict each val / test chip (at the training size, masks returned at the chip's 256 px);
# the union of the instance masks (confidence ≥ 0.25) is the PV mask, scored with the same `mask_set_metrics`
# as `aegir evaluate`.

# %%
model = yb.import_ultralytics().YOLO(yolo["weights"], task="segment")


def union_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    result = model.predict(str(path), imgsz=128, conf=0.25, device="cpu", verbose=False, retina_masks=True)[0]
    if result.masks is None:
        return np.zeros(shape, bool)
    return result.masks.data.cpu().numpy().astype(bool).any(axis=0)


pixel = {}
predicted = {}
for split_name in ("val", "test"):
    split_pairs = []
    for image in sorted((EXPORT / "images" / split_name).glob("*.png")):
        truth = stored[image.stem]
        predicted[image.stem] = union_mask(image, truth.shape)
        split_pairs.append((image.stem, predicted[image.stem], truth))
    pixel[split_name] = mask_set_metrics(split_pairs)
scores = maps.join(pd.DataFrame({s: {"pixel_iou": m["pixel_iou"], "mean_iou": m["mean_iou"]}
                                 for s, m in pixel.items()}).T)
RESULTS["yolo"] = {"epochs": yolo["epochs"], "seconds": yolo["seconds"],
                   "scores": scores.reset_index().rename(columns={"index": "split"}).to_dict("records")}
scores.round(3)

# %%
test_images = sorted((EXPORT / "images" / "test").glob("*.png"), key=lambda p: -stored[p.stem].sum())[:3]
figure, axes = plt.subplots(2, len(test_images), figsize=(3.3 * len(test_images), 6.6))
for col, image in enumerate(test_images):
    rgb = np.asarray(PILImage.open(image).convert("RGB"))
    axes[0, col].imshow(mask_overlay(rgb, stored[image.stem]))
    axes[0, col].set_title("stored mask", fontsize=8)
    axes[1, col].imshow(mask_overlay(rgb, predicted[image.stem]))
    axes[1, col].set_title(f"YOLO union, IoU {pixel['test']['per_image'][image.stem]['iou']:.2f}", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
figure.tight_layout()
show(figure, "yolo_test_predictions")

# %% [markdown]
# ## Reading the results
#
# The export is faithful (polygons rasterise back onto the stored masks) and Ultralytics reads every split
# without a missing or corrupt label, so a longer run is only a matter of budget. After a minute of CPU
# training from random init, at half resolution, YOLO-seg is at the start of its curves; the comparison with
# SMP that means something is the 300-epoch, 256 px benchmark in the README, on this same split.

# %%
RESULTS["seconds"] = round(time.perf_counter() - STARTED, 1)
save_results(RESULTS, WORK)
print(json.dumps(RESULTS, indent=1, default=str))

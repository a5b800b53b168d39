"""YOLO-seg baseline: ``training_data`` → an Ultralytics YOLO segmentation dataset, trained and scored with
``ultralytics`` (the optional ``yolo`` extra) so its mask mAP can sit next to the SMP model's IoU.

**Export** (:func:`export_yolo_dataset`, no ultralytics needed) writes under ``OUT`` (through
:mod:`aegir.store.yolo_files`, which also reads label files back: ``read_label_polygons``)::

    images/{train,val,test}/<uuid>.png   the chip as RGB uint8 (H, W, 3); non-uint8 / other band counts go
                                         through Chip.rgb8 (the view ``aegir predict`` feeds the model)
    labels/{train,val,test}/<uuid>.txt   one line per PV component: ``0 x1 y1 x2 y2 ...`` (class 0 = pv),
                                         x = column / W, y = row / H in 0..1 (6 decimals); empty file = no PV
    data.yaml                            path (absolute), train / val / test (image folders), names {0: pv}
    split.json                           the SplitInfo (uuids, cells, table version) + config + export counts

The split is :func:`aegir.training.datamodule.make_splits` on the same table version (``config.dataset_version``
or the current one), so one :class:`TrainConfig` gives the SMP run and the YOLO export the same uuids.

**Polygons** follow Ultralytics' own mask converter (``convert_segment_masks_to_yolo_seg``): outer contours of
each 8-connected component (``cv2.findContours``, ``RETR_EXTERNAL``, ``CHAIN_APPROX_SIMPLE``) through the
boundary pixels' indices. Limitations of the YOLO polygon format: holes are filled (a PV array around a
courtyard becomes one solid polygon), and components whose contour has < 3 points (1-pixel specks, 1-pixel-wide
lines) are dropped (counted in ``dropped_polygons``).

**Ultralytics** is imported offline: ``YOLO_OFFLINE=1`` and ``YOLO_AUTOINSTALL=false`` are set (unless already
set) before the first import, so it never pip-installs or phones home, and its ``check_font`` (which otherwise
probes GitHub for Arial.ttf on every dataset check) returns a local font while offline. Models are built from
their YAML (random init, ``pretrained=False``): no weights are downloaded. Ultralytics still writes its settings
file to ``$YOLO_CONFIG_DIR`` (default ``~/.config/Ultralytics``) on first import, and a ``labels/<split>.cache``
file next to the labels when a dataset is scanned.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import cv2
import numpy as np
import torch

from aegir.store import training_files, yolo_files
from aegir.training.config import TrainConfig
from aegir.training.datamodule import SPLITS, make_splits, uuid_filter
from aegir.training.lance_tensors import training_batch_to_tensors

CLASS_NAMES = {0: "pv"}
READ_COLUMNS = ["uuid", "vhr_image_chip", "generated_mask", "truth_mask", "metadata"]
INSTALL_HINT = ("ultralytics is not installed; install the `yolo` extra and ultralytics without its opencv-python "
                "dependency: pip install -e '.[yolo]' && pip install --no-deps ultralytics==8.4.190")


# ---- masks ↔ polygons --------------------------------------------------------------------------------------


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> tuple[list[np.ndarray], int]:
    """Outer polygons of the PV components of an (H, W) mask (PV where > 0).

    Returns ``(polygons, dropped)``: each polygon is a (K, 2) float64 array of normalised (x = col / W,
    y = row / H) vertices, K ≥ ``min_points``; ``dropped`` counts components with fewer points."""
    height, width = mask.shape
    contours, _ = cv2.findContours((mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    kept = [c.reshape(-1, 2) for c in contours if len(c) >= min_points]
    scale = np.array([width, height], dtype=np.float64)
    return [c.astype(np.float64) / scale for c in kept], len(contours) - len(kept)


def polygons_to_mask(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 0/1 mask of normalised (K, 2) polygons, filled with ``cv2.fillPoly`` (inverse of
    :func:`mask_to_polygons` up to the filled holes and dropped specks)."""
    height, width = shape
    mask = np.zeros((height, width), dtype=np.uint8)
    points = [np.rint(np.asarray(p) * [width, height]).astype(np.int32) for p in polygons]
    if points:
        cv2.fillPoly(mask, points, 1)
    return mask


def label_text(polygons: list[np.ndarray], class_id: int = 0) -> str:
    """YOLO segmentation label file content: ``class x1 y1 x2 y2 ...`` per polygon (6 decimals), '' for none."""
    return "".join(f"{class_id} " + " ".join(f"{v:.6f}" for v in p.reshape(-1)) + "\n" for p in polygons)


# ---- export ------------------------------------------------------------------------------------------------


def _decoded_rows(batch) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(uuid, (C, H, W) chip, (H, W) uint8 0/1 mask) per row; batches mixing chip shapes go row by row."""
    try:
        out = training_batch_to_tensors(batch)
    except ValueError:
        if batch.num_rows == 1:
            raise
        for i in range(batch.num_rows):
            yield from _decoded_rows(batch.slice(i, 1))
        return
    yield from zip(batch["uuid"].to_pylist(), out["image"].numpy(), out["mask"].numpy())


def _rgb8(chip: np.ndarray, uuid: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a (C, H, W) chip."""
    if chip.dtype != np.uint8 or chip.shape[0] != 3:
        from affine import Affine
        from rasterio.crs import CRS

        from aegir.utils.types import Chip

        bands = tuple(f"b{i}" for i in range(chip.shape[0]))
        chip = Chip(chip, CRS.from_epsg(4326), Affine.identity(), 1.0, bands, uuid).rgb8()
    return np.ascontiguousarray(np.moveaxis(chip, 0, -1))


def export_yolo_dataset(dataset_uri: str | None, out_dir: str | Path, config: TrainConfig | None = None,
                        lancedb_root: str = "data/lancedb", overwrite: bool = False,
                        batch_size: int = 32) -> dict[str, Any]:
    """Write the YOLO-seg layout of a ``training_data`` table (see the module doc) under ``out_dir``.

    ``dataset_uri`` / ``lancedb_root``: as ``aegir train`` takes them; ``config``: the split (level, fractions,
    salt), filters and table version. Returns ``{"out_dir", "data_yaml", "split_json", "dataset_uri",
    "dataset_version", "counts": {split: images}, "objects": {split: polygons}, "empty_labels": {split: files},
    "dropped_polygons": int}``."""
    config = config or TrainConfig()
    out = Path(out_dir)
    yolo_files.prepare_export_dir(out, SPLITS, overwrite)
    dataset, uri = training_files.pinned_training_dataset(dataset_uri, lancedb_root, config.dataset_version)
    split = make_splits(dataset, uri, config)
    counts, objects, empty, dropped = {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}, 0
    for name in SPLITS:
        if not split.uuids[name]:
            continue
        batches = dataset.to_batches(columns=READ_COLUMNS, filter=uuid_filter(split.uuids[name]),
                                     batch_size=batch_size)
        for batch in batches:
            for uuid, chip, mask in _decoded_rows(batch):
                polygons, lost = mask_to_polygons(mask)
                yolo_files.write_sample(out, name, uuid, _rgb8(chip, uuid), label_text(polygons))
                counts[name] += 1
                objects[name] += len(polygons)
                empty[name] += not polygons
                dropped += lost
        if counts[name] != len(split.uuids[name]):
            raise RuntimeError(f"{name}: exported {counts[name]} rows of {len(split.uuids[name])} in the split")
    data_yaml = yolo_files.write_data_yaml(out, SPLITS, CLASS_NAMES)
    report = {"out_dir": str(out), "data_yaml": str(data_yaml), "split_json": str(out / yolo_files.SPLIT_FILE),
              "dataset_uri": uri, "dataset_version": split.dataset_version, "counts": counts, "objects": objects,
              "empty_labels": empty, "dropped_polygons": dropped}
    record = json.loads(split.to_json()) | {"config": config.to_dict(), "yolo_export": report}
    yolo_files.write_export_record(out, record)
    return report


# ---- ultralytics -------------------------------------------------------------------------------------------


def _local_font(font: str = "Arial.ttf") -> Path:
    """Offline stand-in for ``ultralytics.utils.checks.check_font``: its cached copy, else matplotlib's DejaVu."""
    from matplotlib import font_manager
    from ultralytics.utils import USER_CONFIG_DIR

    cached = USER_CONFIG_DIR / Path(font).name
    return cached if cached.exists() else Path(font_manager.findfont("DejaVu Sans"))


def import_ultralytics():
    """The ``ultralytics`` module, imported offline (see the module doc); ImportError naming the extra if absent."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    from aegir.compat import torchvision_nms  # before torchvision is imported

    try:
        import ultralytics
        import ultralytics.data.utils as data_utils
        import ultralytics.utils as ul_utils
        import ultralytics.utils.plotting as plotting
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    torchvision_nms.enable_torchvision_ops_nms()  # ultralytics' NMS calls torchvision.ops.nms
    if not ul_utils.ONLINE:
        data_utils.check_font = plotting.check_font = _local_font
    for handler in ul_utils.LOGGER.handlers:  # progress and logs to stderr: stdout is for our JSON results
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)
    return ultralytics


def _verify_split(folder: Path, num_classes: int) -> dict[str, Any]:
    """Ultralytics' own per-file label verifier over one image folder."""
    from ultralytics.data.utils import IMG_FORMATS, img2label_paths, verify_image_label

    images = yolo_files.image_files_in(folder, IMG_FORMATS)
    result = {"images": len(images), "found": 0, "missing": 0, "empty": 0, "corrupt": 0, "instances": 0,
              "segments": 0, "messages": []}
    for image, label in zip(images, img2label_paths(images)):
        args = (image, label, "", False, num_classes, 0, 0, False)  # no keypoints, not single-class
        _, lb, _, segments, _, nm, nf, ne, nc, msg = verify_image_label(args)
        result["found"] += nf
        result["missing"] += nm
        result["empty"] += ne
        result["corrupt"] += nc
        result["instances"] += 0 if lb is None else len(lb)
        result["segments"] += len(segments or [])
        if msg:
            result["messages"].append(msg)
    return result


def check_yolo_dataset(data_yaml: str | Path, imgsz: int = 256) -> dict[str, Any]:
    """Open an export the way Ultralytics does: ``check_det_dataset`` (the data.yaml checker), its per-file label
    verifier (``verify_image_label``) on every image / label pair, and a ``YOLODataset(task="segment")`` per
    non-empty split, whose first sample is rasterised to ``masks``.

    Returns ``{"ok", "nc", "names", "splits": {split: {images, found, missing, empty, corrupt, instances,
    segments, messages, dataset_labels, mask_shape}}}``; ``ok`` is True when no split has missing or corrupt
    labels and every label row is a polygon. Raises ImportError when ultralytics is not installed."""
    import_ultralytics()
    from ultralytics.data import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(data_yaml), autodownload=False)
    report: dict[str, Any] = {"nc": data["nc"], "names": data["names"], "splits": {}}
    for split in SPLITS:
        if not data.get(split):
            continue
        result = _verify_split(Path(data[split]), data["nc"])
        if result["images"]:
            dataset = YOLODataset(img_path=data[split], data=data, task="segment", imgsz=imgsz, augment=False,
                                  prefix=f"{split}: ")
            result["dataset_labels"] = len(dataset.labels)
            result["mask_shape"] = list(dataset[0]["masks"].shape)
        report["splits"][split] = result
    report["ok"] = all(r["missing"] == 0 and r["corrupt"] == 0 and r["segments"] == r["instances"]
                       and r.get("dataset_labels", 0) == r["images"] for r in report["splits"].values())
    return report


def _scores(metrics) -> dict[str, float]:
    return {"mask_map50": float(metrics.seg.map50), "mask_map50_95": float(metrics.seg.map),
            "box_map50": float(metrics.box.map50), "box_map50_95": float(metrics.box.map)}


def train_yolo_baseline(data_yaml: str | Path, out_dir: str | Path, model: str = "yolo11n-seg.yaml",
                        epochs: int = 30, imgsz: int = 256, device: str = "cpu", batch: int = 8, seed: int = 0,
                        splits: tuple[str, ...] = ("val", "test"), **overrides: Any) -> dict[str, Any]:
    """Train a YOLO segmentation model from its architecture YAML (random init, no download) on an export, then
    validate the best weights on ``splits``.

    ``imgsz``: training / validation image size in pixels; ``batch``: images per step; ``overrides``: any other
    Ultralytics train argument (``fraction``, ``patience``, ``workers``, ``amp``...). Runs land in
    ``out_dir/train`` and ``out_dir/val_<split>``. Returns ``{"weights", "save_dir", "epochs", "seconds",
    "metrics": {split: {mask_map50, mask_map50_95, box_map50, box_map50_95}}}`` (mAP in 0..1, masks at IoU 0.5
    and averaged over IoU 0.5:0.95)."""
    ultralytics = import_ultralytics()
    out = Path(out_dir).resolve()
    yolo = ultralytics.YOLO(model, task="segment")
    args = {"data": str(data_yaml), "epochs": epochs, "imgsz": imgsz, "device": device, "batch": batch,
            "seed": seed, "pretrained": False, "plots": False, "amp": False, "project": str(out), "name": "train",
            "exist_ok": True, "verbose": False} | overrides
    threads, started = torch.get_num_threads(), time.perf_counter()
    try:  # ultralytics sets torch's CPU threads to min(8, cores - 1) for the whole process
        yolo.train(**args)
        seconds = time.perf_counter() - started
        metrics = {}
        for split in splits:
            result = yolo.val(data=str(data_yaml), split=split, imgsz=imgsz, batch=batch, device=device,
                              plots=False, project=str(out), name=f"val_{split}", exist_ok=True, verbose=False)
            metrics[split] = _scores(result)
    finally:
        torch.set_num_threads(threads)
    trainer = yolo.trainer
    return {"weights": str(trainer.best if trainer.best.exists() else trainer.last), "save_dir": str(trainer.save_dir),
            "epochs": int(epochs), "seconds": round(seconds, 1), "metrics": metrics}

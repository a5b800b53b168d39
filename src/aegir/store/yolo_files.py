"""YOLO-seg dataset files (the Ultralytics layout of :mod:`aegir.training.yolo_baseline`'s export)::

    images/<split>/<uuid>.png   RGB uint8 chip (written BGR by OpenCV, as PNG)
    labels/<split>/<uuid>.txt   ``class x1 y1 x2 y2 ...`` per polygon (normalised 0..1); empty file = no object
    data.yaml                   path (absolute), one ``<split>: images/<split>`` line per split, names
    split.json                  the export record (JSON)
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_FILE = "split.json"
DATA_YAML = "data.yaml"


def prepare_export_dir(out: Path, splits: Iterable[str], overwrite: bool) -> None:
    """Empty ``images/<split>`` and ``labels/<split>`` folders under ``out``; an earlier export there is replaced
    when ``overwrite``, else FileExistsError."""
    parts = [out / "images", out / "labels", out / DATA_YAML, out / SPLIT_FILE]
    if any(p.exists() for p in parts):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a YOLO export "
                                  "(overwrite=True, or --overwrite on the CLI, replaces it)")
        for p in parts:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    for split in splits:
        (out / "images" / split).mkdir(parents=True)
        (out / "labels" / split).mkdir(parents=True)


def write_sample(out: Path, split: str, uuid: str, rgb: np.ndarray, label: str) -> None:
    """``images/<split>/<uuid>.png`` from an (H, W, 3) uint8 RGB array and ``labels/<split>/<uuid>.txt``."""
    import cv2

    if not re.fullmatch(r"[\w.-]+", uuid):
        raise ValueError(f"uuid {uuid!r} cannot be used as a file name")
    image = out / "images" / split / f"{uuid}.png"
    if not cv2.imwrite(str(image), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {image}")
    (out / "labels" / split / f"{uuid}.txt").write_text(label)


def write_data_yaml(out: Path, splits: Iterable[str], names: Mapping[int, str]) -> Path:
    """``out/data.yaml`` for Ultralytics (strings JSON-quoted, which YAML reads as-is; no PyYAML needed)."""
    lines = [f"path: {json.dumps(str(out.resolve()))}"] + [f"{s}: images/{s}" for s in splits]
    lines += ["names:"] + [f"  {k}: {v}" for k, v in names.items()]
    path = out / DATA_YAML
    path.write_text("\n".join(lines) + "\n")
    return path


def write_export_record(out: Path, record: dict[str, Any]) -> Path:
    """``out/split.json``: the export record (split, config, counts), indented JSON."""
    path = out / SPLIT_FILE
    path.write_text(json.dumps(record, indent=1))
    return path


def read_label_polygons(path: str | Path) -> list[np.ndarray]:
    """The (K, 2) normalised polygons of a YOLO segmentation label file (class ids dropped)."""
    rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
    return [np.array(row[1:], dtype=np.float64).reshape(-1, 2) for row in rows]


def image_files_in(folder: Path, suffixes: Iterable[str]) -> list[str]:
    """Sorted paths of the files in ``folder`` whose suffix (lower case, no dot) is one of ``suffixes``."""
    wanted = set(suffixes)
    return sorted(str(p) for p in folder.iterdir() if p.suffix.lower().lstrip(".") in wanted)

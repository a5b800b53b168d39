"""YOLO-seg export of the real Jiang PV01 ``training_data`` table, its check by Ultralytics, an offline tiny train."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from aegir.pipelines.dataset import build_dataset_from_images
from aegir.store import lance_io, yolo_files
from aegir.store.chip_codec import decode_chip
from aegir.training import yolo_baseline as yb
from aegir.training.config import TrainConfig
from aegir.training.datamodule import LanceSegmentationData, SPLITS, make_splits

from conftest import SHARED_DATA, make_settings

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"


@pytest.fixture(scope="module")
def jiang_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    settings = make_settings(root)
    uri = str(root / "lancedb" / "training_data")
    build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", uri, "jiang_pv01")
    report = yb.export_yolo_dataset(uri, root / "export", TrainConfig(), settings.lancedb_root)
    return settings, uri, report


@pytest.fixture(scope="module")
def ultralytics():
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics is not installed (the `yolo` extra + `pip install --no-deps ultralytics`)")
    return yb.import_ultralytics()


def _stored_rows(settings, uri) -> dict[str, dict]:
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return {row["uuid"]: row for row in table.to_arrow().to_pylist()}


def test_export_uses_the_training_split_and_writes_the_yolo_layout(jiang_export):
    settings, uri, report = jiang_export
    out = Path(report["out_dir"])
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    split = make_splits(table.to_lance(), table.to_lance().uri, TrainConfig())
    assert report["counts"] == split.counts() == {"train": 40, "val": 10, "test": 10}
    data = LanceSegmentationData(uri, TrainConfig(), settings.lancedb_root)
    data.setup()  # what `aegir train` reads: same table version, same uuids per split
    recorded = json.loads((out / "split.json").read_text())
    assert recorded["dataset_version"] == report["dataset_version"] == data.dataset_version
    for name in SPLITS:
        images = {p.stem for p in (out / "images" / name).glob("*.png")}
        labels = {p.stem for p in (out / "labels" / name).glob("*.txt")}
        assert images == labels == set(split.uuids[name]) == set(data.split.uuids[name]) == set(recorded["uuids"][name])
    config = yaml.safe_load((out / "data.yaml").read_text())
    assert config == {"path": str(out.resolve()), "train": "images/train", "val": "images/val",
                      "test": "images/test", "names": {0: "pv"}}
    assert recorded["yolo_export"]["counts"] == report["counts"] and recorded["config"]["split_level"] == 15


def test_images_are_the_chips_and_polygons_rasterise_back_to_the_masks(jiang_export):
    settings, uri, report = jiang_export
    out = Path(report["out_dir"])
    rows = _stored_rows(settings, uri)
    inter = union = empty = 0
    for label in sorted(out.glob("labels/*/*.txt")):
        row = rows[label.stem]
        meta = row["metadata"]
        chip = decode_chip(row["vhr_image_chip"], meta["vhr_encoding"], meta["vhr_shape"], meta["vhr_dtype"])
        mask = decode_chip(row["truth_mask"] or row["generated_mask"], meta["mask_encoding"], meta["mask_shape"], "uint8") > 0
        png = cv2.imread(str(out / "images" / label.parent.name / f"{label.stem}.png"), cv2.IMREAD_COLOR)
        assert np.array_equal(png[..., ::-1], np.moveaxis(chip, 0, -1))
        lines = label.read_text().splitlines()
        assert all(line.split()[0] == "0" and len(line.split()) >= 7 and len(line.split()) % 2 == 1 for line in lines)
        polygons = yolo_files.read_label_polygons(label)
        assert all(((p >= 0) & (p < 1)).all() for p in polygons)
        back = yb.polygons_to_mask(polygons, mask.shape) > 0
        if not mask.any():
            assert not lines
            empty += 1
            continue
        assert (back & mask).sum() / (back | mask).sum() >= 0.9, label.stem
        inter, union = inter + (back & mask).sum(), union + (back | mask).sum()
    assert empty == sum(report["empty_labels"].values()) == 1  # one Jiang ground-truth mask is empty
    assert inter / union >= 0.99
    assert sum(report["objects"].values()) == sum(len(p.read_text().splitlines()) for p in out.glob("labels/*/*.txt"))


def test_polygon_limits_holes_filled_specks_dropped():
    mask = np.zeros((40, 60), np.uint8)
    mask[5:25, 5:25] = 1
    mask[10:15, 10:15] = 0  # a hole
    mask[30, 50] = 1  # a one-pixel speck: a 1-point contour
    mask[30:35, 30:45] = 1
    polygons, dropped = yb.mask_to_polygons(mask)
    assert (len(polygons), dropped) == (2, 1)
    back = yb.polygons_to_mask(polygons, mask.shape)
    expected = mask.copy()
    expected[10:15, 10:15], expected[30, 50] = 1, 0
    assert np.array_equal(back, expected)
    assert yb.label_text([]) == "" and yb.label_text(polygons).count("\n") == 2


def test_export_refuses_to_overwrite_an_export(jiang_export, tmp_path):
    _, uri, report = jiang_export
    with pytest.raises(FileExistsError, match="overwrite=True"):
        yb.export_yolo_dataset(uri, report["out_dir"], TrainConfig())


def test_missing_ultralytics_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "ultralytics" or m.startswith("ultralytics.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(ImportError, match=r"\.\[yolo\]"):
        yb.check_yolo_dataset("unused/data.yaml")


def test_ultralytics_checker_opens_the_export(jiang_export, ultralytics):
    _, _, report = jiang_export
    result = yb.check_yolo_dataset(report["data_yaml"])
    assert result["ok"] and result["nc"] == 1 and result["names"] == {0: "pv"}
    for name in SPLITS:
        split = result["splits"][name]
        assert split["images"] == split["found"] == split["dataset_labels"] == report["counts"][name]
        assert split["instances"] == split["segments"] == report["objects"][name]
        assert split["corrupt"] == split["missing"] == 0 and split["empty"] == report["empty_labels"][name]


def test_ultralytics_checker_flags_a_broken_label(jiang_export, ultralytics, tmp_path):
    _, _, report = jiang_export
    out = tmp_path / "broken"
    shutil.copytree(report["out_dir"], out, ignore=shutil.ignore_patterns("*.cache"))
    yolo_files.write_data_yaml(out, SPLITS, yb.CLASS_NAMES)
    label = sorted((out / "labels" / "val").glob("*.txt"))[0]
    label.write_text(label.read_text() + "0 0.5 0.5 1.7 0.5 0.6 0.9\n")  # x = 1.7: off the image
    result = yb.check_yolo_dataset(out / "data.yaml")
    assert not result["ok"] and result["splits"]["val"]["corrupt"] == 1
    assert result["splits"]["val"]["dataset_labels"] == report["counts"]["val"] - 1


OFFLINE_TRAIN = textwrap.dedent("""
    import json, socket, sys
    attempts = []
    def blocked(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError("network disabled by the test")
    socket.getaddrinfo = socket.create_connection = socket.socket.connect = blocked
    from aegir.training.yolo_baseline import train_yolo_baseline
    result = train_yolo_baseline(sys.argv[1], sys.argv[2], epochs=1, imgsz=128, batch=4, fraction=0.2,
                                 splits=("val",), workers=0)
    print(json.dumps({"result": result, "attempts": attempts}))
""")


def test_tiny_yolo_train_runs_offline_and_reports_mask_map(jiang_export, ultralytics, tmp_path):
    _, _, report = jiang_export
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    env |= {"YOLO_CONFIG_DIR": str(tmp_path / "config"), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", OFFLINE_TRAIN, report["data_yaml"], str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    payload = json.loads(run.stdout.strip().splitlines()[-1])
    assert payload["attempts"] == []  # no download, no font probe, no analytics
    result = payload["result"]
    assert Path(result["weights"]).is_file() and result["epochs"] == 1
    scores = result["metrics"]["val"]
    assert set(scores) == {"mask_map50", "mask_map50_95", "box_map50", "box_map50_95"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_non_uint8_or_multiband_chips_become_rgb8():
    rng = np.random.default_rng(0)
    chip = rng.integers(0, 4000, (4, 8, 9)).astype(np.uint16)
    rgb = yb._rgb8(chip, "row")
    assert rgb.shape == (8, 9, 3) and rgb.dtype == np.uint8 and rgb.max() == 255 and rgb.min() == 0
    grey = np.arange(72, dtype=np.uint8).reshape(1, 8, 9)
    assert np.array_equal(yb._rgb8(grey, "row"), np.repeat(grey, 3, axis=0).transpose(1, 2, 0))


def test_cli_exports_and_checks(jiang_export, tmp_path, ultralytics):
    from typer.testing import CliRunner

    from aegir.cli import app

    settings, uri, _ = jiang_export
    runner = CliRunner()
    result = runner.invoke(app, ["yolo", "export", "--dataset-uri", uri, "--out", str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"] == {"train": 40, "val": 10, "test": 10}
    again = runner.invoke(app, ["yolo", "export", "--dataset-uri", uri, "--out", str(tmp_path / "y")])
    assert again.exit_code == 1 and "--overwrite" in again.output
    checked = runner.invoke(app, ["yolo", "check", str(tmp_path / "y" / "data.yaml")])
    assert checked.exit_code == 0, checked.output
    assert json.loads(checked.stdout)["ok"] is True

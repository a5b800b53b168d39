"""Capacity-relation files: USPVDB's capacity columns (the fit's input) and the shipped fitted relation
(``aegir/defaults/capacity_dc.toml``, written by ``bench/capacity_fit.py --write``).

Units: ``p_area`` m², ``p_cap_dc`` / ``p_cap_ac`` MW (USPVDB's own columns, read as they are).
"""

from __future__ import annotations

import json
import math
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

import pandas as pd

USPVDB_CAPACITY_COLUMNS = ("case_id", "p_state", "p_area", "p_cap_dc", "p_cap_ac")
CAPACITY_RESOURCE = ("aegir.defaults", "capacity_dc.toml")
CAPACITY_TABLE = "capacity_dc"
RELATION_KEYS = ("intercept", "slope", "log_residual_low", "log_residual_high", "area_min_m2", "area_max_m2")


def read_uspvdb_capacity(path: str | Path) -> pd.DataFrame:
    """``case_id``, ``p_state``, ``p_area`` (m²), ``p_cap_dc``, ``p_cap_ac`` (MW, float; non-numeric → NaN) of a
    USPVDB CSV. ValueError naming the file when it is unreadable or lacks one of these columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such USPVDB CSV")
    try:
        frame = pd.read_csv(path, encoding="utf-8-sig", low_memory=False)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ValueError(f"{path}: cannot read as CSV ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in USPVDB_CAPACITY_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a USPVDB table, missing column(s) {', '.join(missing)}; "
                         f"columns are {list(frame.columns)}")
    frame = frame[list(USPVDB_CAPACITY_COLUMNS)].copy()
    for column in ("p_area", "p_cap_dc", "p_cap_ac"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def default_capacity_path() -> Path:
    """The shipped relation file (inside the installed package)."""
    return Path(str(resources.files(CAPACITY_RESOURCE[0]).joinpath(CAPACITY_RESOURCE[1])))


def read_capacity_params(path: str | Path | None = None) -> dict[str, Any]:
    """The ``[capacity_dc]`` table of ``path`` (default: the shipped file); ValueError naming the file when it is
    not TOML, lacks the table or a key, or a coefficient is not a finite number."""
    path = Path(path) if path is not None else default_capacity_path()
    try:
        params = tomllib.loads(path.read_text()).get(CAPACITY_TABLE)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    if not isinstance(params, dict):
        raise ValueError(f"{path}: no [{CAPACITY_TABLE}] table")
    for key in RELATION_KEYS:
        value = params.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{path}: [{CAPACITY_TABLE}] {key} must be a finite number, got {value!r}")
    quantiles = params.get("interval_quantiles")
    if not (isinstance(quantiles, list) and len(quantiles) == 2 and 0 <= quantiles[0] < quantiles[1] <= 1):
        raise ValueError(f"{path}: [{CAPACITY_TABLE}] interval_quantiles must be [low, high] in 0..1, "
                         f"got {quantiles!r}")
    return params


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for this text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def write_capacity_params(params: dict[str, Any], path: str | Path, header: str = "") -> Path:
    """``params`` (scalars, lists, and one level of sub-tables) as the ``[capacity_dc]`` table of a TOML file,
    after ``header`` (comment lines)."""
    path = Path(path)
    flat = {k: v for k, v in params.items() if not isinstance(v, dict)}
    lines = [f"# {line}".rstrip() for line in header.splitlines()] + [f"[{CAPACITY_TABLE}]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in flat.items()]
    for name, table in params.items():
        if isinstance(table, dict):
            lines += ["", f"[{CAPACITY_TABLE}.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path

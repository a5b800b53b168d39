"""``aegir flywheel``: seed → train → evaluate → detect, then per round: gated pseudo-labels → warm-started
training → evaluate → detect. Configured by data: the package's ``defaults/flywheel.toml`` under ``--config``.

Round 0 trains on the labelled seed alone; round k ≥ 1 adds the pseudo-label windows round k − 1's detect step
admitted (:mod:`aegir.dataflows.pseudo_labels`: the model's components that its test-time views, the Mask Factory
and the RGB evidence all agree on; empty windows every view calls empty) and starts from round k − 1's
checkpoint with the same budget. Ground truth is never replaced or down-weighted: pseudo-labels are rows of their
own (``flywheel_pseudo_r<k>``, mask source ``flywheel:pseudo`` / ``flywheel:negative``, per-row confidence and
evidence in ``provenance.params_json``) that always train and weigh ``source_weights`` in the loss.

Every round is scored on data no step of the loop reads for training or gating: the seed's test part, the target
truth (the hold-out target part's masks and ``target_truth``), and the transfer tiles with their boxes. Each
step's result goes to ``OUT/flywheel_state.json`` as it finishes; a re-run resumes after the last finished step.
The per-round table: ``OUT/flywheel_rounds.csv`` / ``.json`` / ``.png``. Round k's model: ``OUT/round_<k>/train/best.ckpt``.
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from aegir.config import Settings
from aegir.store import run_files

STEPS = ("data", "train", "evaluate", "detect")
DEFAULTS_RESOURCE = ("aegir.defaults", "flywheel.toml")


@dataclass
class FlywheelConfig:
    """The ``[flywheel]`` table (every field documented in ``aegir/defaults/flywheel.toml``, which holds the
    defaults; none live here)."""

    rounds: int
    seed: int
    seed_images: str
    seed_masks: str
    seed_uri: str
    holdout_level: int
    holdout_target_share: float
    holdout_test_share: float
    target_images: list[str]
    target_truth: str
    transfer_images: str
    transfer_boxes: str
    window_px: int
    tta_views: list[int]
    mask_factory: str
    max_positive_share: float
    max_negative_share: float
    warm_start: bool
    warm_start_lr_scale: float
    quicklook_images: int
    train: dict[str, Any] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)

    def resolved(self, settings: Settings) -> "FlywheelConfig":
        """``{sample_data}`` in every path replaced by the settings' shared-data folder."""
        data = str(settings.sample_data_dir)

        def fill(text: str) -> str:
            return text.replace("{sample_data}", data)

        values = asdict(self)
        for name in ("seed_images", "seed_masks", "seed_uri", "target_truth", "transfer_images", "transfer_boxes"):
            values[name] = fill(values[name])
        values["target_images"] = [fill(t) for t in self.target_images]
        return FlywheelConfig(**values)


def default_config_text() -> str:
    """The shipped ``flywheel.toml``."""
    return resources.files(DEFAULTS_RESOURCE[0]).joinpath(DEFAULTS_RESOURCE[1]).read_text()


def _merge(base: dict, override: dict, where: str) -> dict:
    names = {f.name for f in fields(FlywheelConfig)}
    unknown = sorted(set(override) - names)
    if unknown:
        raise ValueError(f"{where}: unknown [flywheel] key(s) {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    merged = dict(base)
    for key, value in override.items():
        if key in ("train", "gate") and not isinstance(value, dict):
            raise ValueError(f"{where}: [flywheel.{key}] must be a table, got {value!r}")
        merged[key] = {**base.get(key, {}), **value} if key in ("train", "gate") else value
    return merged


def load_flywheel_config(path: str | Path | None = None, **overrides: Any) -> FlywheelConfig:
    """The shipped defaults, then ``path``'s ``[flywheel]`` table, then ``overrides`` that are not None; unknown
    keys or values of the wrong kind are a ValueError naming the file."""
    values = tomllib.loads(default_config_text())["flywheel"]
    where = "aegir/defaults/flywheel.toml"
    if path is not None:
        where = str(path)
        try:
            table = run_files.read_toml(path, "flywheel config file").get("flywheel")
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not a TOML file ({exc})") from exc
        if not isinstance(table, dict):
            raise ValueError(f"{path}: no [flywheel] table")
        values = _merge(values, table, where)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given and path is None:
        where = "flywheel overrides"
    values = json.loads(json.dumps(_merge(values, given, where)))  # tuples → lists, as the state file stores them
    config = FlywheelConfig(**values)
    _check(config, where)
    return config


def _kind_problems(values: dict[str, Any], cls: type, table: str) -> list[str]:
    """``key: expected <type>, got <value>`` for every value of ``values`` whose type does not fit ``cls``'s field
    annotation (int, float, str, bool, list, dict, or None where the field is optional)."""
    import types
    import typing

    hints = typing.get_type_hints(cls)
    problems = []
    for key, value in values.items():
        hint = hints.get(key)
        if hint is None:
            continue
        options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kinds = {typing.get_origin(o) or o for o in options}
        if float in kinds:
            kinds.add(int)
        fits = (value is None and type(None) in kinds) or any(
            isinstance(value, k) and not (k is int and isinstance(value, bool) and bool not in kinds)
            for k in kinds if isinstance(k, type) and k is not type(None))
        if not fits:
            problems.append(f"[{table}] {key}: expected {hint}, got {value!r}")
    return problems


def _check(config: FlywheelConfig, where: str) -> None:
    from aegir.dataflows.pseudo_labels import PseudoLabelGate
    from aegir.masks import available_backends
    from aegir.training.config import TrainConfig, TrainConfigError

    problems = _kind_problems({k: v for k, v in asdict(config).items() if k not in ("train", "gate")},
                              FlywheelConfig, "flywheel")
    problems += _kind_problems(config.train, TrainConfig, "flywheel.train")
    problems += _kind_problems(config.gate, PseudoLabelGate, "flywheel.gate")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    if not set(config.tta_views) <= set(range(8)) or not config.tta_views:
        raise ValueError(f"{where}: tta_views must be dihedral codes 0..7, got {config.tta_views}")
    if config.mask_factory not in available_backends():
        raise ValueError(f"{where}: mask_factory {config.mask_factory!r} is not one of {', '.join(available_backends())}")
    if not config.warm_start_lr_scale > 0:
        raise ValueError(f"{where}: warm_start_lr_scale must be > 0, got {config.warm_start_lr_scale}")
    if config.rounds < 0 or config.window_px < 32:
        raise ValueError(f"{where}: rounds must be >= 0 and window_px >= 32")
    if not 0 <= config.holdout_target_share + config.holdout_test_share < 1:
        raise ValueError(f"{where}: holdout_target_share + holdout_test_share must lie in [0, 1)")
    if not (config.seed_images or config.seed_uri):
        raise ValueError(f"{where}: give seed_images (+ seed_masks) or seed_uri")
    if isinstance(config.target_images, str):
        raise ValueError(f"{where}: target_images must be a list of paths")
    try:
        TrainConfig.from_dict(config.train)
        PseudoLabelGate(**config.gate)
    except (TypeError, TrainConfigError) as exc:
        raise ValueError(f"{where}: {exc}") from exc


class FlywheelState:
    """``OUT/flywheel_state.json``: {"config": …, "rounds": {"0": {step: result}}}; written after every step."""

    def __init__(self, out: Path, config: FlywheelConfig) -> None:
        self.path = out / "flywheel_state.json"
        self.data: dict[str, Any] = {"config": asdict(config), "rounds": {}}
        if run_files.is_file(self.path):
            try:
                self.data = run_files.read_json(self.path)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}: unreadable flywheel state ({exc}); move it away to start over") from exc
            stored = {k: v for k, v in self.data.get("config", {}).items() if k != "rounds"}
            if stored != {k: v for k, v in asdict(config).items() if k != "rounds"}:
                raise ValueError(f"{self.path}: this run folder was made with another flywheel config; use a new "
                                 f"--out or the same config (only rounds may change)")

    def result(self, round_index: int, step: str) -> dict | None:
        return self.data["rounds"].get(str(round_index), {}).get(step)

    def record(self, round_index: int, step: str, result: dict) -> None:
        self.data["rounds"].setdefault(str(round_index), {})[step] = result
        run_files.write_json(self.data, self.path, atomic=True)


def run_flywheel(settings: Settings, out_dir: str | Path, config: FlywheelConfig | None = None,
                 on_step: Callable[[int, str, dict, bool], None] | None = None) -> list[dict]:
    """Run (or resume) rounds 0..``config.rounds``; returns the per-round table rows. ``on_step(round, step,
    result, skipped)`` is called after every step (``skipped``: it was already done)."""
    from aegir.pipelines import flywheel_steps as steps
    from aegir.pipelines.flywheel_detect import step_detect

    out = run_files.ensure_dir(out_dir)
    config = (config or load_flywheel_config()).resolved(settings)
    state = FlywheelState(out, config)
    functions = {"data": steps.step_data, "train": steps.step_train, "evaluate": steps.step_evaluate,
                 "detect": step_detect}
    table = []
    for round_index in range(0, config.rounds + 1):
        context = steps.RoundContext(settings, config, out, round_index, state)
        for step in STEPS:
            done = state.result(round_index, step)
            if done is None:
                started = time.perf_counter()
                result = functions[step](context)
                result["seconds"] = round(time.perf_counter() - started, 1)
                state.record(round_index, step, result)
            if on_step:
                on_step(round_index, step, done or state.result(round_index, step), done is not None)
        table.append(steps.round_summary(context))
        write_round_table(out, table)
    return table


def write_round_table(out: Path, table: list[dict]) -> None:
    """``OUT/flywheel_rounds.json``, ``.csv`` (one row per round) and ``.png`` (the summary plot)."""
    from aegir.utils.quicklook import flywheel_summary_figure

    run_files.write_json(table, out / "flywheel_rounds.json")
    if table:
        run_files.write_figure(flywheel_summary_figure(table), out / "flywheel_rounds.png")
        run_files.write_csv([{k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
                             for row in table], out / "flywheel_rounds.csv")

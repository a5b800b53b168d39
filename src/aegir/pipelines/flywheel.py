"""``aegir flywheel``: ingest → masks → dataset → train → infer → validate → backfill, N rounds, resumable.

Each round's steps write their result into ``OUT/flywheel_state.json`` as they finish; a re-run (after a crash or
Ctrl-C) skips every step already recorded and goes on with the next. One row per round goes to
``OUT/flywheel_rounds.csv`` / ``.json`` (and a summary plot ``.png``): training rows, masks by source, validation IoU, detections accepted /
rejected / for review, backfilled samples and the ``training_data`` version the round trained on.

On the embedded defaults the shared data plays these parts:
- **ingest**: the shared PV label sets into the DuckLake lakehouse (idempotent: later rounds add nothing).
- **masks**: the Mask Factory (offline backend) on the seed tiles, prompted by one box per ground-truth
  component, scored against the ground truth: the quality gate of the prompt → mask path the backfill uses.
- **dataset**: round 1 upserts the seed tiles (Jiang PV01 + ground-truth masks); later rounds train on the
  version the previous backfill wrote (seed + backfilled samples).
- **train**: ``aegir train`` with a short, time-capped CPU recipe.
- **infer**: region inference over the Austin tiles (their grid from the file names) → detections.
- **validate**: score and shape checks (no Sentinel-2 scene covers Austin in the shared data, so MSI evidence is
  not required there: ``require_msi = False``), plus agreement with the previous round's detections.
- **embed_tiles**: every ``backfill_chip_px``² window of the region tiles embedded with the round's encoder into
  the LanceDB ``tile_embeddings`` table (footprint, S2 cell at ``plan_level``); skipped when both hooks are off.
- **mine_negatives** (``mine_hard_negatives``): the windows nearest to the rejected detections that touch no
  accepted / needs-review detection and no label → ``round_<k>/mined_negatives.parquet`` and, with ``add_mined_negatives``, empty-mask
  chips in ``training_data`` (dataset ``flywheel_mined``, mask source ``mined_negative``).
- **find_similar** (``find_similar_tiles``): the unlabelled windows nearest to the accepted detections →
  ``round_<k>/similar_tiles.parquet`` and a boost for the grid-plan cells holding them; the next round's
  **infer** plans those cells first.
- **backfill**: accepted detections → chips with masks from the ``model`` backend (the round's checkpoint,
  prompted by each detection's box); rejected → hard-negative chips; one new ``training_data`` version.

The per-round table reports both hooks (``on`` / ``off``, proposed / added negatives, cells re-prioritised) and
what they did one round later: the share of the previous round's mined windows the new model detects PV in again
(``mined_redetected_share``), and the share of boosted cells holding an accepted detection against the share of
all cells (``boosted_cell_hit_rate`` vs ``cell_hit_rate``).
"""

from __future__ import annotations

import json
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from aegir.config import Settings
from aegir.sample_data import AUSTIN_TILES
from aegir.store import run_files

STEPS = ("ingest", "masks", "dataset", "train", "infer", "validate", "embed_tiles", "mine_negatives",
         "find_similar", "backfill")


@dataclass
class FlywheelConfig:
    """What a flywheel run uses; defaults are the shared data and a CPU recipe that finishes in minutes."""

    seed_images: str = ""  # default: <sample_data_dir>/vhr/jiang_pv01/images (+ masks beside)
    seed_masks: str = ""
    region_tiles: str = ""  # default: <sample_data_dir>/vhr/nrel_panel_segmentation/sol-searcher_data_examples
    train_max_epochs: int = 12
    train_max_minutes: float = 3.0
    train_batch_size: int = 8
    infer_threshold: float = 0.5
    min_score: float = 0.6
    min_area_m2: float = 2.0
    min_rectangularity: float = 0.35
    backfill_chip_px: int = 256
    max_backfill: int = 64  # accepted detections backfilled per round (highest score first)
    max_hard_negatives: int = 64  # rejected detections kept as hard negatives per round (highest score first)
    import_labels: bool = True
    plan_level: int = 14  # S2 level of the region's grid-plan cells (inference and tile embeddings)
    # embedding hooks (issue #8); windows and query crops are backfill_chip_px² pixels
    mine_hard_negatives: bool = True  # (a) tile windows nearest to rejected detections → negatives
    mine_k: int = 5  # nearest windows per rejected detection
    max_mined_negatives: int = 32  # per round, nearest first
    add_mined_negatives: bool = True  # write them as empty-mask chips to training_data (else proposals only)
    find_similar_tiles: bool = True  # (b) cells of windows nearest to accepted detections → inferred first
    similar_k: int = 5  # nearest unlabelled windows per accepted detection
    train_overrides: dict[str, Any] = field(default_factory=dict)  # any other TrainConfig field, e.g. encoder

    def resolved(self, settings: Settings) -> "FlywheelConfig":
        data = Path(settings.sample_data_dir)
        jiang = data / "vhr" / "jiang_pv01"
        return FlywheelConfig(**{**asdict(self),
                                 "seed_images": self.seed_images or str(jiang / "images"),
                                 "seed_masks": self.seed_masks or str(jiang / "masks"),
                                 "region_tiles": self.region_tiles or str(data / AUSTIN_TILES)})


def load_flywheel_config(path: str | Path | None) -> FlywheelConfig:
    """Defaults, or a TOML file's ``[flywheel]`` table (unknown keys are an error naming the file)."""
    if path is None:
        return FlywheelConfig()
    path = Path(path)
    try:
        values = run_files.read_toml(path, "flywheel config file").get("flywheel", {})
        return FlywheelConfig(**values)
    except (tomllib.TOMLDecodeError, TypeError) as exc:
        raise ValueError(f"{path}: cannot use this flywheel config ({exc})") from exc


class FlywheelState:
    """``OUT/flywheel_state.json``: {"config": …, "rounds": {"1": {step: result}}}; written after every step."""

    def __init__(self, out: Path, config: FlywheelConfig) -> None:
        self.path = out / "flywheel_state.json"
        self.data: dict[str, Any] = {"config": asdict(config), "rounds": {}}
        if run_files.is_file(self.path):
            try:
                self.data = run_files.read_json(self.path)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.path}: unreadable flywheel state ({exc}); move it away to start over") from exc

    def result(self, round_index: int, step: str) -> dict | None:
        return self.data["rounds"].get(str(round_index), {}).get(step)

    def record(self, round_index: int, step: str, result: dict) -> None:
        self.data["rounds"].setdefault(str(round_index), {})[step] = result
        run_files.write_json(self.data, self.path, atomic=True)


def run_flywheel(settings: Settings, out_dir: str | Path, rounds: int = 2, config: FlywheelConfig | None = None,
                 on_step: Callable[[int, str, dict, bool], None] | None = None) -> list[dict]:
    """Run (or resume) ``rounds`` rounds; returns the per-round table rows. ``on_step(round, step, result,
    skipped)`` is called after every step (``skipped``: it was already done)."""
    from aegir.pipelines.flywheel_steps import RoundContext

    out = run_files.ensure_dir(out_dir)
    step_functions = _step_functions()
    config = (config or FlywheelConfig()).resolved(settings)
    state = FlywheelState(out, config)
    table = []
    for round_index in range(1, rounds + 1):
        context = RoundContext(settings, config, out, round_index, state)
        for step in STEPS:
            done = state.result(round_index, step)
            if done is None:
                started = time.perf_counter()
                result = step_functions[step](context)
                result["seconds"] = round(time.perf_counter() - started, 1)
                state.record(round_index, step, result)
            if on_step:
                on_step(round_index, step, done or state.result(round_index, step), done is not None)
        table.append(round_summary(context))
    write_round_table(out, table)
    return table


def _step_functions() -> dict[str, Callable[[Any], dict]]:
    """Step name → the function that runs it on a :class:`~aegir.pipelines.flywheel_steps.RoundContext`."""
    from aegir.pipelines import flywheel_hooks as hooks
    from aegir.pipelines import flywheel_steps as steps

    return {"ingest": steps.step_ingest, "masks": steps.step_masks, "dataset": steps.step_dataset,
            "train": steps.step_train, "infer": steps.step_infer, "validate": steps.step_validate,
            "embed_tiles": hooks.step_embed_tiles, "mine_negatives": hooks.step_mine_negatives,
            "find_similar": hooks.step_find_similar, "backfill": steps.step_backfill}


def round_summary(context: Any) -> dict:
    """One row of the per-round table (``context``: the round's ``RoundContext``, every step recorded)."""
    from aegir.pipelines.flywheel_hooks import hook_columns

    dataset, train = context.earlier("dataset"), context.earlier("train")
    validate, backfill = context.earlier("validate"), context.earlier("backfill")
    return {"round": context.round_index, "rows": dataset["rows"], "data_version": dataset["version"],
            "masks_by_source": dataset["masks_by_source"], "val_iou": train.get("val_iou"),
            "held_out_pixel_iou": validate["held_out"]["pixel_iou"],
            "held_out_object_f1": validate["held_out"]["object"]["f1"],
            "detections": validate["detections"], "accepted": validate["accepted"], "rejected": validate["rejected"],
            "needs_review": validate["needs_review"], "backfilled": backfill["backfilled"],
            "hard_negatives": backfill["hard_negatives"], "version_after_backfill": backfill["version"],
            **hook_columns(context)}


def write_round_table(out: Path, table: list[dict]) -> None:
    """``OUT/flywheel_rounds.json``, ``.csv`` (one row per round) and ``.png`` (the summary plot)."""
    from aegir.utils.quicklook import flywheel_summary_figure

    run_files.write_json(table, out / "flywheel_rounds.json")
    if table:
        run_files.write_figure(flywheel_summary_figure(table), out / "flywheel_rounds.png")
        run_files.write_csv([{k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()}
                             for row in table], out / "flywheel_rounds.csv")

"""Training configuration: one flat, JSON-able dataclass, read from TOML / JSON / YAML and stored in checkpoints.

No torch here, so the CLI can parse a config without importing the training stack.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ARCHITECTURES = ("unet", "fpn", "deeplabv3plus", "unetplusplus", "linknet", "pspnet", "manet", "pan", "segformer")
INPUTS = ("vhr", "msi", "vhr+msi")
NORMALIZATIONS = ("dataset", "per_image")
MONITORS = ("val/iou", "val/f1", "val/mean_iou", "val/loss")


class TrainConfigError(ValueError):
    """A training config file or value that cannot be used."""


def _check_val_cells(tokens: list[str]) -> None:
    """One S2 level in 1..17 for every token (the rows carry level-17 tokens)."""
    import numpy as np

    from aegir.utils import s2geometry

    try:
        levels = sorted(set(s2geometry.cell_level(s2geometry.token_to_cell_id(np.array(tokens))).tolist()))
    except ValueError as exc:
        raise TrainConfigError(f"val_cells: {exc}") from None
    if len(levels) != 1 or not 1 <= levels[0] <= 17:
        raise TrainConfigError(f"val_cells must be S2 tokens of one level in 1..17, got levels {levels}")


@dataclass
class TrainConfig:
    """Everything a training run needs besides the table location; defaults are the CPU quality recipe.

    Splits: every row goes to train / val / test by a deterministic hash of its S2 cell at ``split_level``
    (parent of the row's level-17 token), so the three splits never share a cell. Level 15 (~300 m cells) gives
    the 60 Jiang PV01 tiles 40 / 10 / 10 rows (level 13 has only 9 cells, one holding 21 tiles).
    """

    # model
    arch: str = "unet"
    encoder: str = "resnet18"
    # None: random init (offline). A weight name smp knows for the encoder ("imagenet", "ssl", "swsl", "advprop",
    # ...; for tu- encoders "imagenet" = timm's default tag, or a timm tag such as "a1_in1k"): downloaded by
    # segmentation_models_pytorch from the Hugging Face hub when online, read from the HF cache
    # ($HF_HOME/hub/models--smp-hub--<encoder>.<weights>/snapshots/<commit>/model.safetensors) offline.
    # A local state-dict file (path / .pth / .pt / .safetensors ...): loaded as stored. Used at training only.
    encoder_weights: str | None = None
    inputs: str = "vhr"  # vhr (RGB), msi (Sentinel-2 bands, upsampled to the chip grid), vhr+msi (stacked)
    normalization: str = "dataset"  # dataset: train-split band mean / std; per_image: each chip by its own
    init_checkpoint: str | None = None  # warm start: weights (and band stats) of this best.ckpt, same arch/encoder
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: int = 2
    max_epochs: int = 60
    max_minutes: float | None = None  # wall-clock cap on fitting (Lightning max_time); best.ckpt is kept
    max_steps: int | None = None  # optimizer-step budget (Lightning max_steps): the same training on a busy machine
    monitor: str = "val/iou"  # best.ckpt by: val/iou, val/f1, val/mean_iou (higher) or val/loss (lower: robust
    #                           when the validation cells hold little PV)
    # > 0: validate and checkpoint an exponential moving average of the weights, updated after every optimizer
    # step with this decay (0.9 ≈ the last 10 steps); with init_checkpoint the average starts from those weights
    ema_decay: float = 0.0
    batch_size: int = 8
    epoch_repeats: int = 1  # passes over the train split per epoch (tiny tables: fewer validation rounds)
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    augment: bool = True  # flips + rot90, identical on image and mask
    crop_size: int | None = None  # train on random square crops of this many pixels (None: whole chips)
    scale_range: list[float] | None = None  # [lo, hi] zoom-out factor per train chip (e.g. [0.35, 1]: 0.1 m → 0.29 m)
    color_jitter: float = 0.0  # brightness / contrast / saturation / per-band gain drawn in 1 ± this (train only)
    blur_sigma: float = 0.0  # Gaussian blur, sigma ~ U(0, this) px, on half of the train chips
    source_weights: dict[str, float] = field(default_factory=dict)  # loss weight per metadata.mask_source (else 1)
    seed: int = 0
    # data
    split_level: int = 15
    val_fraction: float = 0.2
    test_fraction: float = 0.15
    split_salt: str = ""
    # S2 tokens (one level, <= 17) whose rows are the validation split, e.g. a hold-out part chosen by whole cells;
    # given, they replace the hashed val draw (val_fraction) and the other rows go to train / test by the hash
    val_cells: list[str] = field(default_factory=list)
    dataset_version: int | None = None  # None: the table's current version (recorded in the checkpoint)
    filter_dataset: list[str] = field(default_factory=list)
    train_only_datasets: list[str] = field(default_factory=list)  # rows of these datasets never go to val / test
    filter_s2_cell: str | None = None  # S2 cell token of any level <= 17: rows inside that cell
    filter_date_from: str | None = None  # metadata.acquired_at >= (ISO date/time, UTC)
    filter_date_to: str | None = None  # metadata.acquired_at < next day of this date (inclusive date)
    filter_mask_source: list[str] = field(default_factory=list)  # e.g. ground_truth, mask_factory:offline
    mask_target: str = "auto"  # the mask trained on: auto (truth where a row has it, else generated), truth, generated
    filter_provenance_backend: list[str] = field(default_factory=list)
    stats_max_rows: int = 2048  # rows of the train split used for the per-band mean / std
    num_workers: int = 0
    shuffle_buffer: int = 256
    # trainer
    accelerator: str = "auto"
    devices: str | int = "auto"
    precision: str = "32-true"
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    log_every_n_steps: int = 5
    progress_bar: bool = True
    wandb: bool = True
    wandb_project: str = "aegir"
    tensorboard: bool = False
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default

    def __post_init__(self) -> None:
        if self.arch.lower() not in ARCHITECTURES:
            raise TrainConfigError(f"arch {self.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.inputs not in INPUTS:
            raise TrainConfigError(f"inputs {self.inputs!r} is not one of {', '.join(INPUTS)}")
        if self.monitor not in MONITORS:
            raise TrainConfigError(f"monitor {self.monitor!r} is not one of {', '.join(MONITORS)}")
        if self.normalization not in NORMALIZATIONS:
            raise TrainConfigError(f"normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if self.scale_range is not None and not (len(self.scale_range) == 2
                                                 and 0.1 <= self.scale_range[0] <= self.scale_range[1] <= 1):
            raise TrainConfigError(f"scale_range must be [lo, hi] with 0.1 <= lo <= hi <= 1, got {self.scale_range}")
        if not 0 <= self.ema_decay < 1:
            raise TrainConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.color_jitter < 0 or self.color_jitter >= 1 or self.blur_sigma < 0:
            raise TrainConfigError("color_jitter must lie in [0, 1) and blur_sigma be >= 0")
        if any(not w >= 0 for w in self.source_weights.values()):
            raise TrainConfigError(f"source_weights must be >= 0, got {self.source_weights}")
        if self.mask_target not in ("auto", "truth", "generated"):
            raise TrainConfigError(f"mask_target {self.mask_target!r} is not one of auto, truth, generated")
        if not 1 <= int(self.split_level) <= 17:
            raise TrainConfigError(f"split_level must be 1..17, got {self.split_level}")
        if not (0 <= self.val_fraction and 0 <= self.test_fraction and self.val_fraction + self.test_fraction < 1):
            raise TrainConfigError("val_fraction and test_fraction must be >= 0 and sum to < 1")
        if self.val_cells:
            _check_val_cells(self.val_cells)
        if self.crop_size is not None and self.crop_size < 32:
            raise TrainConfigError(f"crop_size must be >= 32 pixels (or unset), got {self.crop_size}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.epoch_repeats < 1 or (self.max_steps or 1) < 1:
            raise TrainConfigError("batch_size, max_epochs, max_steps and epoch_repeats must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise TrainConfigError(f"unknown training config key(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults < file (TOML with an optional ``[train]`` table, JSON, or YAML) < ``overrides`` that are not None."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"{path}: no such training config file")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                values = json.loads(text)
            elif path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = tomllib.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error names the file
            raise TrainConfigError(f"{path}: cannot parse training config ({exc})") from exc
        if isinstance(values.get("train"), dict):
            values = values["train"]
        if not isinstance(values, dict):
            raise TrainConfigError(f"{path}: a training config must be a table of key = value")
    try:
        config = TrainConfig.from_dict(values)
    except TypeError as exc:
        raise TrainConfigError(str(exc)) from exc
    return config.replace(**overrides)

"""``aegir train``: fit a segmentation model on a ``training_data`` table and write ``OUT/best.ckpt``.

Loggers: CSV always (``OUT/logs/csv``), Weights & Biases (``OUT/wandb``; offline unless ``WANDB_API_KEY`` is set,
``WANDB_MODE`` respected when given), TensorBoard when ``config.tensorboard`` (``OUT/logs/tensorboard``).
The split and band statistics are written to ``OUT/split.json`` and stored in every checkpoint (run files:
:mod:`aegir.store.training_files`).
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch

from aegir.store import training_files
from aegir.training.config import TrainConfig
from aegir.training.datamodule import LanceSegmentationData
from aegir.training.litmodule import BestCheckpoint, SegmentationLitModule


@dataclass
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    data_version: int
    split_counts: dict[str, int]
    best_metrics: dict[str, float]
    epochs: int
    seconds: float


def _wandb_logger(config: TrainConfig, out: Path, name: str | None):
    """A WandbLogger that never reaches the network without an API key (offline run files under OUT/wandb)."""
    if not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_DISABLE_GIT", "true")
    try:
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:  # pragma: no cover - wandb is an install dependency of the training extra
        return None
    training_files.wandb_dir(out)
    return WandbLogger(project=config.wandb_project, name=name, save_dir=str(out),
                       offline=os.environ.get("WANDB_MODE") == "offline", config=config.to_dict())


def make_loggers(config: TrainConfig, out: Path, name: str | None = None) -> list:
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    loggers: list = [CSVLogger(str(out / "logs"), name="csv", version="")]
    if config.tensorboard:
        loggers.append(TensorBoardLogger(str(out / "logs"), name="tensorboard", version=""))
    if config.wandb:
        logger = _wandb_logger(config, out, name)
        if logger is not None:
            loggers.append(logger)
    return loggers


def _keep_trained_version(dataset_uri: str, version: int) -> None:
    """Tag the table version this run reads (``keep-v<N>``) so ``aegir dataset optimize`` never removes the data a
    checkpoint names; a store the run may only read gets a warning, not a failed run."""
    from aegir.store import lance_io

    try:
        lance_io.keep_version(dataset_uri, version)
    except (lance_io.StoreError, OSError, ValueError) as exc:
        warnings.warn(f"{dataset_uri}: version {version} not tagged keep-v{version} ({exc}); `aegir dataset "
                      f"optimize --keep {version}` keeps it", stacklevel=2)


def run_training(dataset_uri: str | None, config: TrainConfig, out_dir: str | Path,
                 lancedb_root: str = "data/lancedb", run_name: str | None = None) -> TrainResult:
    """Fit ``config`` on the train split of ``dataset_uri``, validate on the val split each epoch, keep the best
    val IoU as ``out_dir/best.ckpt``."""
    out = training_files.run_dir(out_dir)
    started = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = LanceSegmentationData(dataset_uri, config, lancedb_root)
    data.setup("fit")
    training_files.write_split_json(out, data.split.to_json())
    _keep_trained_version(data.split.dataset_uri, data.dataset_version)
    module = SegmentationLitModule(config, data.stats)
    has_val = bool(data.split.uuids["val"])
    best = BestCheckpoint(out, data.dataset_version, data.split.dataset_uri,
                          data.split.summary() | {"band_stats": data.stats}, monitor=config.monitor)
    max_time = None
    if config.max_minutes:
        seconds = int(config.max_minutes * 60)
        max_time = {"days": 0, "hours": seconds // 3600, "minutes": (seconds % 3600) // 60, "seconds": seconds % 60}
    trainer = L.Trainer(
        accelerator=config.accelerator, devices=config.devices, precision=config.precision,
        max_epochs=config.max_epochs, max_steps=config.max_steps or -1, max_time=max_time,
        logger=make_loggers(config, out, run_name),
        callbacks=[best], enable_checkpointing=False, enable_progress_bar=config.progress_bar,
        log_every_n_steps=config.log_every_n_steps, default_root_dir=str(out), num_sanity_val_steps=0,
        limit_train_batches=config.limit_train_batches, limit_val_batches=config.limit_val_batches if has_val else 0,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*IterableDataset.*has `__len__`.*")
        warnings.filterwarnings("ignore", message=".*Total length of .* across ranks is zero.*")
        trainer.fit(module, datamodule=data)
    for logger in trainer.loggers:
        logger.finalize("success")
    if config.wandb:
        try:
            import wandb

            wandb.finish()
        except Exception as exc:  # noqa: BLE001 - logging teardown must not fail a finished run
            warnings.warn(f"wandb.finish() failed: {exc}", stacklevel=2)
    best_path = out / "best.ckpt"
    if not training_files.checkpoint_exists(best_path):
        raise RuntimeError(f"training wrote no checkpoint to {best_path} (no epoch finished)")
    return TrainResult(str(best_path), str(out / "last.ckpt"), data.dataset_version, data.split.counts(),
                       best.best_metrics, trainer.current_epoch, time.perf_counter() - started)

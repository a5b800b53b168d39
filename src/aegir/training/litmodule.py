"""LightningModule over segmentation_models_pytorch, checkpoints loadable with ``torch.load(weights_only=True)``,
and the network the other stages load for inference (:mod:`aegir.training.inference_model`).

The network normalises its own input (per-band mean / std of the train split are buffers), so every caller hands
it raw pixels (uint8 RGB, or float MSI reflectance) exactly as they sit in ``training_data``.

``best.ckpt`` is written by :class:`BestCheckpoint` (not Lightning's ModelCheckpoint, whose files carry optimizer
and callback state that needs pickle): ``{"format", "state_dict" (tensors), "config" (JSON-able dict),
"data_version", "dataset_uri", "band_stats", "split", "metrics", "epoch"}``, only tensors and plain
str/int/float/bool/None/list/dict. Checkpoint files are written and read by :mod:`aegir.store.training_files`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex, BinaryPrecision, BinaryRecall

from aegir.store import training_files
from aegir.store.lance_io import MASK_IGNORE
from aegir.store.training_files import CHECKPOINT_FORMAT
from aegir.training.config import TrainConfig


def _smp():
    import segmentation_models_pytorch as smp

    return smp


def build_network(arch: str, encoder: str, in_channels: int, encoder_weights: str | None = None) -> nn.Module:
    """An smp network with one output channel (PV logit): randomly initialised when ``encoder_weights`` is None;
    the encoder loaded from a local state-dict file when it is a path; pretrained weights by name (``"imagenet"``,
    any name smp knows for the encoder, a timm tag for ``tu-`` encoders) fetched the smp way (Hugging Face download,
    or its cache offline) by :func:`aegir.store.training_files.resolve_encoder_weights`. Only training builds call
    this with weights; trained checkpoints rebuild the network without them."""
    smp = _smp()
    net = smp.create_model(arch, encoder_name=encoder, encoder_weights=None, in_channels=in_channels, classes=1)
    if encoder_weights and not training_files.is_encoder_weights_path(encoder_weights):
        state = training_files.resolve_encoder_weights(
            encoder, encoder_weights, in_channels=in_channels, depth=getattr(net.encoder, "_depth", 5),
            output_stride=getattr(net.encoder, "_output_stride", 32))
        nn.Module.load_state_dict(net.encoder, state)  # the encoder's own layout: every tensor, strictly
    elif encoder_weights:
        state = training_files.read_encoder_weights(encoder_weights)
        state = {k.removeprefix("encoder."): v for k, v in state.items()}
        missing, _ = nn.Module.load_state_dict(net.encoder, state, strict=False)
        if len(missing) == len(net.encoder.state_dict()):
            raise ValueError(f"encoder_weights {encoder_weights}: no tensor matches encoder {encoder}")
    return net


class SegmentationNet(nn.Module):
    """Normalisation + smp network; input raw pixels (B, C, H, W), output logits (B, 1, H, W).

    ``normalization``: ``dataset`` subtracts / divides by the train split's per-band mean / std (buffers);
    ``per_image`` standardises every image by its own per-band mean / std (robust to a new sensor's radiometry)."""

    def __init__(self, arch: str, encoder: str, band_mean: list[float], band_std: list[float],
                 encoder_weights: str | None = None, normalization: str = "dataset") -> None:
        super().__init__()
        self.normalization = normalization
        self.register_buffer("band_mean", torch.tensor(band_mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("band_std", torch.tensor(band_std, dtype=torch.float32).view(1, -1, 1, 1))
        self.net = build_network(arch, encoder, len(band_mean), encoder_weights)

    def standardized(self, image: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) float32 network input of raw ``image``: per_image statistics over the (B, H, W) ``valid``
        pixels when given (all pixels otherwise), or the dataset's band statistics."""
        image = image.float()
        if self.normalization != "per_image":
            return (image - self.band_mean) / self.band_std
        if valid is None:
            mean, std = image.mean(dim=(2, 3), keepdim=True), image.std(dim=(2, 3), keepdim=True)
        else:
            weight = valid[:, None].to(image.dtype)
            count = weight.sum(dim=(2, 3), keepdim=True).clamp(min=2.0)
            mean = (image * weight).sum(dim=(2, 3), keepdim=True) / count
            std = (((image - mean) ** 2 * weight).sum(dim=(2, 3), keepdim=True) / (count - 1)).sqrt()
        return (image - mean) / std.clamp(min=1.0 if self.band_std.mean() > 1 else 1e-3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardized(image))


class SegmentationLitModule(L.LightningModule):
    """Dice + BCE on PV logits; pixel IoU / F1 / precision / recall per epoch (torchmetrics) plus mean per-image
    IoU; AdamW with linear warm-up then cosine decay (per epoch). With ``ema_decay`` > 0 an exponential moving
    average of the weights (a mean teacher that starts from ``init_checkpoint``) is what validates and what the
    checkpoints keep."""

    def __init__(self, config: TrainConfig, band_stats: dict[str, list[float]]) -> None:
        super().__init__()
        self.config = config
        self.band_stats = band_stats
        self.model = SegmentationNet(config.arch, config.encoder, band_stats["mean"], band_stats["std"],
                                     config.encoder_weights, config.normalization)
        if config.init_checkpoint:  # the previous model's band statistics come with its weights
            self.band_stats = warm_start(self.model, config)
        ignore = {"ignore_index": MASK_IGNORE}
        metrics = MetricCollection({"iou": BinaryJaccardIndex(**ignore), "f1": BinaryF1Score(**ignore),
                                    "precision": BinaryPrecision(**ignore), "recall": BinaryRecall(**ignore)})
        self.train_metrics = metrics.clone(prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._image_ious: dict[str, list[float]] = {"val": [], "test": []}
        self._ema: dict[str, torch.Tensor] | None = None  # the averaged weights (``ema_decay`` > 0)
        self._trained: dict[str, torch.Tensor] | None = None  # the optimizer's weights while the average validates

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image)

    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(batch["image"])[:, 0]
        target = batch["mask"].float()
        weight = batch.get("weight")
        loss = weighted_dice_bce(logits, target, weight if weight is not None else torch.ones(len(target)),
                                 self.config.dice_weight, self.config.bce_weight)
        pred = logits.detach() > 0
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        metrics.update(pred.long(), batch["mask"].long())  # ignore_index: MASK_IGNORE pixels do not count
        if stage != "train":
            truth, known = batch["mask"] == 1, batch["mask"] != MASK_IGNORE
            inter = (pred & truth & known).flatten(1).sum(1).float()
            union = ((pred | truth) & known).flatten(1).sum(1).float()
            ious = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
            self._image_ious[stage] += ious.tolist()
        self.log(f"{stage}/loss", loss, on_step=stage == "train", on_epoch=True, prog_bar=True,
                 batch_size=batch["image"].shape[0])
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def _epoch_end(self, stage: str) -> None:
        metrics = {"train": self.train_metrics, "val": self.val_metrics, "test": self.test_metrics}[stage]
        if any(m.update_called for m in metrics.values()):
            self.log_dict(metrics.compute(), prog_bar=stage != "train")
        metrics.reset()
        if stage != "train":
            ious = self._image_ious[stage]
            if ious:
                self.log(f"{stage}/mean_iou", float(np.mean(ious)), prog_bar=True)
            self._image_ious[stage] = []

    def on_train_epoch_end(self) -> None:
        self._epoch_end("train")

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")
        self._restore_trained()

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    def on_train_start(self) -> None:
        self._fit_started = time.monotonic()
        if self.config.ema_decay > 0 and self._ema is None:
            self._ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._ema is None:
            return
        decay = self.config.ema_decay
        with torch.no_grad():
            for name, value in self.model.state_dict().items():
                if value.is_floating_point():
                    self._ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)
                else:
                    self._ema[name].copy_(value)

    def on_validation_epoch_start(self) -> None:
        if self._ema is not None:  # validate the average; the optimizer's weights come back afterwards
            self._trained = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.model.load_state_dict(self._ema)

    def _restore_trained(self) -> None:
        if self._trained is not None:
            self.model.load_state_dict(self._trained)
            self._trained = None

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint keeps: the moving average when ``ema_decay`` > 0, else the model's."""
        return self._ema if self._ema is not None else self.model.state_dict()

    def schedule_progress(self, epoch: int) -> float:
        """Fraction of training done at the start of ``epoch``: by epochs, by optimizer steps when ``max_steps``
        is set, or by wall clock when ``max_minutes`` is set — whichever budget runs out first (so the cosine
        decay ends with the budget on any machine)."""
        cfg = self.config
        progress = epoch / max(1, cfg.max_epochs)
        if cfg.max_steps:
            progress = max(progress, self.global_step / cfg.max_steps)
        started = getattr(self, "_fit_started", None)
        if cfg.max_minutes and started is not None:
            progress = max(progress, (time.monotonic() - started) / (60 * cfg.max_minutes))
        return min(1.0, progress)

    def configure_optimizers(self):
        cfg = self.config
        optimizer = torch.optim.AdamW(self.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = max(0, cfg.warmup_epochs)

        def factor(epoch: int) -> float:
            """Linear warm-up over ``warmup_epochs``, then cosine from 1 to 0.01 over the remaining progress."""
            if epoch < warmup:
                return (epoch + 1) / (warmup + 1)
            start = warmup / max(1, cfg.max_epochs)
            progress = (self.schedule_progress(epoch) - start) / max(1e-9, 1 - start)
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def weighted_dice_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, dice_weight: float,
                      bce_weight: float) -> torch.Tensor:
    """Loss of (B, H, W) logits against (B, H, W) targets (0, 1, or ``MASK_IGNORE``: left out) with a (B,) weight
    per sample (its mask source): ``dice_weight`` × soft Dice of the weighted batch (one ratio over all known
    pixels of the samples with PV) + ``bce_weight`` × the weighted mean per-sample BCE over known pixels."""
    weight = weight.to(logits.device, logits.dtype)
    norm = weight.sum().clamp(min=1e-6)
    known = (target != MASK_IGNORE).to(logits.dtype).flatten(1)
    target = torch.where(target == MASK_IGNORE, torch.zeros_like(target), target)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1)
    bce = (bce * known).sum(1) / known.sum(1).clamp(min=1)
    prob = torch.sigmoid(logits).flatten(1) * known
    flat = target.flatten(1)
    has_pv = (flat.sum(1) > 0).to(logits.dtype) * weight
    inter = (has_pv[:, None] * prob * flat).sum()
    card = (has_pv[:, None] * (prob + flat)).sum()
    dice = 1 - (2 * inter + 1e-7) / (card + 1e-7) if has_pv.sum() > 0 else logits.sum() * 0
    return dice_weight * dice + bce_weight * (weight * bce).sum() / norm


def warm_start(net: "SegmentationNet", config: TrainConfig) -> dict[str, list[float]]:
    """Load ``config.init_checkpoint``'s weights and band statistics into ``net`` (same arch, encoder and input
    bands, else a ValueError naming the checkpoint); returns those band statistics."""
    payload = training_files.read_checkpoint(config.init_checkpoint)
    previous = payload["config"]
    for key in ("arch", "encoder", "inputs"):
        if str(previous.get(key)) != str(getattr(config, key)):
            raise ValueError(f"init_checkpoint {config.init_checkpoint}: {key} is {previous.get(key)!r}, "
                             f"this run trains {getattr(config, key)!r}")
    net.load_state_dict(payload["state_dict"])
    return payload["band_stats"]


# ---- checkpoints -------------------------------------------------------------------------------------------


def checkpoint_payload(module: SegmentationLitModule, data_version: int, dataset_uri: str,
                       split: dict | None, metrics: dict[str, float], epoch: int) -> dict[str, Any]:
    """A checkpoint made of tensors and plain JSON-able values only (``torch.load(weights_only=True)`` reads it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.weights().items()},
        "config": module.config.to_dict(),
        "data_version": int(data_version),
        "dataset_uri": str(dataset_uri),
        "band_stats": {"mean": [float(v) for v in module.band_stats["mean"]],
                       "std": [float(v) for v in module.band_stats["std"]]},
        "split": split,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "epoch": int(epoch),
    }


def monitor_sign(monitor: str) -> float:
    """+1 when a higher ``monitor`` value is better (IoU, F1), −1 for losses."""
    return -1.0 if monitor.endswith("loss") else 1.0


class BestCheckpoint(L.Callback):
    """Writes ``dirpath/best.ckpt`` whenever ``monitor`` improves or ties (higher IoU / F1, lower loss; a tie goes to
    the later, longer-trained epoch), and ``last.ckpt`` (same format) after every validation; without validation
    batches the train IoU decides."""

    def __init__(self, dirpath: str | Path, data_version: int, dataset_uri: str, split: dict | None,
                 monitor: str = "val/iou") -> None:
        self.dirpath = Path(dirpath)
        self.data_version, self.dataset_uri, self.split = data_version, dataset_uri, split
        self.monitor = monitor
        self.best_score = -math.inf
        self.best_metrics: dict[str, float] = {}

    def _save(self, trainer: L.Trainer, module: SegmentationLitModule, name: str) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        payload = checkpoint_payload(module, self.data_version, self.dataset_uri, self.split, metrics,
                                     trainer.current_epoch)
        training_files.write_checkpoint(payload, self.dirpath / name)

    def on_train_epoch_end(self, trainer: L.Trainer, module: SegmentationLitModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        key = self.monitor if self.monitor in metrics else "train/iou"
        if key not in metrics:
            return
        score = monitor_sign(key) * float(metrics[key])
        if math.isnan(score):
            return
        self._save(trainer, module, "last.ckpt")
        if score >= self.best_score:  # a tie goes to the later epoch (e.g. validation cells the model scores 0 on)
            self.best_score = score
            self.best_metrics = {k: float(v) for k, v in metrics.items() if torch.as_tensor(v).numel() == 1}
            self._save(trainer, module, "best.ckpt")

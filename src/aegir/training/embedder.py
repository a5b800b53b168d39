"""Chip encoders for vector search: pooled encoder features of a trained checkpoint or a local pretrained encoder.

A :class:`ChipEncoder` maps raw chips ``(B, C, H, W)`` (uint8 RGB exactly as stored in ``training_data``) to
``(B, D)`` float32 vectors: the network's own normalisation, the smp encoder, then the global average pool of the
deepest feature map. ``model_id`` names the weights by content hash (``<kind>:<encoder>@<sha256[:16]>``), so the
same weights give the same id wherever the file lies (:func:`aegir.store.training_files.file_digest`) — the key
that makes re-embedding idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aegir.store.training_files import file_digest

IMAGENET_MEAN_255 = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD_255 = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass
class ChipEncoder:
    """``encode((B, C, H, W) array) -> (B, D) float32`` with the provenance stored beside each vector."""

    encoder: torch.nn.Module
    band_mean: torch.Tensor  # (1, C, 1, 1)
    band_std: torch.Tensor
    model_id: str
    checkpoint: str
    data_version: int
    device: torch.device

    @property
    def in_channels(self) -> int:
        return int(self.band_mean.shape[1])

    @property
    def dim(self) -> int:
        return int(self.encoder.out_channels[-1])

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> np.ndarray:
        """(B, D) float32 pooled deepest-encoder features of raw chips (B, C, H, W)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) chips, got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).float().to(self.device)
        x = (x - self.band_mean) / self.band_std
        deepest = self.encoder(x)[-1]
        return deepest.mean(dim=(2, 3)).float().cpu().numpy()


def _device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def encoder_from_checkpoint(checkpoint: str | Path, device: str | None = None) -> ChipEncoder:
    """The encoder of a trained ``aegir train`` checkpoint (``best.ckpt``), with its own band normalisation."""
    from aegir.training.inference_model import load_segmentation_model

    dev = _device(device)
    model = load_segmentation_model(str(checkpoint), device=str(dev))
    net = model.net  # SegmentationNet: normalisation buffers + smp model
    encoder = net.net.encoder.eval()
    model_id = f"ckpt:{model.config['encoder']}@{file_digest(checkpoint)}"
    return ChipEncoder(encoder, net.band_mean, net.band_std, model_id, str(Path(checkpoint).resolve()),
                       model.data_version, dev)


def encoder_from_pretrained(encoder_name: str, weights: str | Path, device: str | None = None,
                            in_channels: int = 3) -> ChipEncoder:
    """An smp encoder loaded from a local state-dict file (never downloaded), ImageNet normalisation of uint8."""
    from aegir.training.litmodule import build_network

    if in_channels != 3:
        raise ValueError("pretrained encoders take RGB (3-band) chips")
    dev = _device(device)
    net = build_network("Unet", encoder_name, in_channels, str(weights))
    encoder = net.encoder.eval().to(dev)
    mean = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD_255, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
    model_id = f"pretrained:{encoder_name}@{file_digest(weights)}"
    return ChipEncoder(encoder, mean, std, model_id, str(Path(weights).resolve()), -1, dev)

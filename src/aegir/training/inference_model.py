"""A trained network for the other stages: :class:`SegmentationModel` (tiled, blended, batched prediction of PV
probabilities through :mod:`aegir.training.predictor`), :func:`load_segmentation_model` (from ``best.ckpt``) and
the autocast precisions of inference on accelerators."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from aegir.store import training_files
from aegir.training.litmodule import SegmentationNet
from aegir.training.predictor import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_OVERLAP_PX,
    DEFAULT_TILE_PX,
    blended_probabilities,
)


class SegmentationModel:
    """A trained network for the other stages: ``predict_proba((C, H, W) image) -> (H, W) float32`` in [0, 1] and
    ``predict_batch((B, C, h, w) tiles) -> (B, h, w)``.

    Images larger than ``tile`` px are predicted in overlapping tiles (``overlap`` px, the outer ``margin`` px of
    each tile left out of the blend, ``batch_size`` tiles per network pass) blended by
    :func:`aegir.training.predictor.blended_probabilities`; smaller ones in one pass. Inputs are padded to the
    network's stride internally (reflect). ``config`` (dict), ``data_version``, ``band_stats``, ``metrics``.

    Speed on accelerators: ``precision`` ``"bf16"`` / ``"fp16"`` runs the network under ``torch.autocast`` (the
    probabilities come back float32), ``"fp32"`` without; ``channels_last`` stores weights and inputs NHWC (what
    cuDNN's tensor-core kernels want). ``"auto"`` / None: bf16 (fp16 where the GPU lacks bf16) and channels_last
    on CUDA, fp32 and NCHW on the CPU. Tiles are copied to the GPU from pinned memory.
    """

    def __init__(self, payload: dict[str, Any], device: str | torch.device = "cpu", tile: int = DEFAULT_TILE_PX,
                 overlap: int = DEFAULT_OVERLAP_PX, batch_size: int = DEFAULT_BATCH_SIZE,
                 margin: int | None = None, precision: str | None = "auto",
                 channels_last: bool | None = None) -> None:
        self.config: dict[str, Any] = payload["config"]
        self.data_version: int = int(payload["data_version"])
        self.dataset_uri: str = payload.get("dataset_uri", "")
        self.band_stats: dict[str, list[float]] = payload["band_stats"]
        self.metrics: dict[str, float] = payload.get("metrics", {})
        self.split: dict | None = payload.get("split")
        self.device = torch.device(device)
        self.tile, self.overlap, self.batch_size, self.margin = tile, overlap, batch_size, margin
        self.net = SegmentationNet(self.config["arch"], self.config["encoder"], self.band_stats["mean"],
                                   self.band_stats["std"], normalization=self.config.get("normalization", "dataset"))
        self.net.load_state_dict(payload["state_dict"])
        self.net.eval().to(self.device)
        self.stride = 32
        self.precision = inference_precision(precision, self.device)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def predict_batch(self, tiles: np.ndarray) -> np.ndarray:
        """(B, h, w) float32 PV probabilities of raw (B, C, h, w) tiles, in one network pass (``per_image``
        models: each tile standardised by its own statistics, as in training)."""
        x = self._on_device(tiles)
        return self._probabilities(self.net.standardized(x), tiles.shape[-2:])

    @torch.inference_mode()
    def standardized(self, image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        """``image`` (C, H, W) as the network's input for tiles cut from it: ``per_image`` models standardise it
        once with the statistics of its ``valid`` (H, W) pixels (float32), so every tile is normalised alike;
        other models get it unchanged (their normalisation is per pixel)."""
        if self.net.normalization != "per_image":
            return image
        x = torch.from_numpy(np.ascontiguousarray(image))[None]
        mask = None if valid is None else torch.from_numpy(np.asarray(valid, bool))[None]
        return self.net.standardized(x, mask)[0].numpy()

    @torch.inference_mode()
    def predict_standardized(self, tiles: np.ndarray) -> np.ndarray:
        """(B, h, w) float32 PV probabilities of (B, C, h, w) tiles cut from :meth:`standardized` images."""
        x = self._on_device(tiles)
        x = self.net.standardized(x) if self.net.normalization != "per_image" else x.float()
        return self._probabilities(x, tiles.shape[-2:])

    def _on_device(self, tiles: np.ndarray) -> torch.Tensor:
        """(B, C, h, w) tiles as a tensor on the device (pinned host memory first on CUDA), shape-checked."""
        if tiles.ndim != 4 or tiles.shape[1] != self.in_channels:
            raise ValueError(f"expected ({self.in_channels}, H, W) tiles, got shape {tiles.shape[1:]}")
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type == "cuda":
            x = x.pin_memory()
        return x.to(self.device, non_blocking=True)

    def _probabilities(self, x: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Sigmoid of the network's logits for network inputs ``x`` (padded to the stride, cropped back)."""
        h, w = size
        ph, pw = (-h) % self.stride, (-w) % self.stride
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode=mode)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = _AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.net.net(x)
        return torch.sigmoid(logits.float())[:, 0, :h, :w].cpu().numpy()

    @property
    def in_channels(self) -> int:
        return len(self.band_stats["mean"])

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """(H, W) float32 PV probability of a (C, H, W) image (uint8 for VHR inputs), tiled and blended."""
        if image.ndim != 3 or image.shape[0] != self.in_channels:
            raise ValueError(f"expected a ({self.in_channels}, H, W) chip, got shape {image.shape}")
        return blended_probabilities(image, self, self.tile, self.overlap, self.batch_size, margin_px=self.margin)


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def inference_precision(precision: str | None, device: torch.device) -> str:
    """``precision`` resolved for ``device``: ``"auto"`` / None → bf16 on CUDA (fp16 where the GPU has no bf16),
    fp32 elsewhere; ValueError for a name outside :data:`PRECISIONS`."""
    if precision in (None, "auto"):
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def load_segmentation_model(checkpoint_path: str, device: str | None = None,
                            precision: str | None = "auto") -> SegmentationModel:
    """A :class:`SegmentationModel` from ``best.ckpt`` (CUDA when available unless ``device`` says otherwise;
    ``precision``: see :class:`SegmentationModel`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return SegmentationModel(training_files.read_checkpoint(checkpoint_path), device=device, precision=precision)

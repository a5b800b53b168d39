"""The Mask Factory backend interface and its result type (the registry of backends by name is :mod:`aegir.masks`).

A backend turns one image (``(H, W, 3)`` uint8 RGB) and a :class:`~aegir.masks.prompts.PixelPrompts` set into one
boolean mask per prompt, in a single pass over the image (one encoder pass for SAM-family models, one GrabCut
colour model for the offline backend), plus per-prompt ``confidence`` and ``stability`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from aegir.masks.prompts import PixelPrompts


class MaskBackendError(RuntimeError):
    """A backend cannot run (missing weights, missing package, bad model) — the message says what to do."""


@dataclass(frozen=True)
class MaskResult:
    """``masks``: (N, H, W) bool, one per prompt (same order as the prompts); ``confidence`` / ``stability``: (N,)."""

    masks: np.ndarray
    confidence: np.ndarray
    stability: np.ndarray
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.masks.shape[0]
        if self.masks.ndim != 3 or self.confidence.shape != (n,) or self.stability.shape != (n,):
            raise ValueError(f"MaskResult shapes disagree: masks {self.masks.shape}, confidence "
                             f"{self.confidence.shape}, stability {self.stability.shape}")

    @classmethod
    def empty(cls, height: int, width: int) -> "MaskResult":
        """The result for no prompts: (0, H, W) masks, empty scores."""
        return cls(np.zeros((0, height, width), bool), np.zeros(0), np.zeros(0))

    @property
    def union(self) -> np.ndarray:
        """(H, W) bool: the union of every prompt's mask."""
        return self.masks.any(axis=0) if self.masks.shape[0] else np.zeros(self.masks.shape[1:], bool)


@runtime_checkable
class MaskBackend(Protocol):
    """What every backend provides."""

    name: str

    @property
    def version(self) -> str: ...

    @property
    def params(self) -> dict[str, Any]: ...

    def segment(self, image: np.ndarray, prompts: PixelPrompts) -> MaskResult: ...

"""Define ``torchvision::nms`` / ``torchvision::qnms`` when torchvision's C++ ops cannot load.

Why: torchvision 0.28.0 from the registry is built against CUDA torch. With the CPU torch 2.13.0 wheel its
``_C.so`` fails to load, ``torchvision.extension`` then reports no ops, but ``torchvision._meta_registrations``
still calls ``torch.library.register_fake("torchvision::nms")``, which raises ``operator torchvision::nms does not
exist`` and aborts ``import torchvision`` (and every library importing it: timm, smp, samgeo, ultralytics).

What: on import, try to load torchvision's own ``_C`` library; if it loads (a matching CUDA or CPU build), do
nothing. Otherwise define both operator schemas and register a pure-torch greedy NMS as their CPU kernel, so
``torchvision.ops.nms`` works (slower than the C++ kernel, same result). Idempotent; safe in spawned workers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_LIBRARY: torch.library.Library | None = None


def _torchvision_c_extension() -> Path | None:
    """Path of torchvision's compiled ops library, or None when torchvision or the file is absent."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for candidate in Path(folder).glob("_C*.so"):
            return candidate
    return None


def _operator_exists(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def nms_reference(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression; ``dets`` (N, 4) as x1, y1, x2, y2. Returns kept indices (int64), best first."""
    if dets.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=dets.device)
    x1, y1, x2, y2 = dets.float().unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    order = scores.argsort(descending=True, stable=True)
    suppressed = torch.zeros(dets.shape[0], dtype=torch.bool, device=dets.device)
    keep: list[int] = []
    for idx in order.tolist():
        if suppressed[idx]:
            continue
        keep.append(idx)
        inter_w = (torch.minimum(x2[idx], x2) - torch.maximum(x1[idx], x1)).clamp(min=0)
        inter_h = (torch.minimum(y2[idx], y2) - torch.maximum(y1[idx], y1)).clamp(min=0)
        inter = inter_w * inter_h
        iou = inter / (areas[idx] + areas - inter).clamp(min=1e-12)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=dets.device)


def install() -> bool:
    """Define the operators if torchvision's ``_C`` cannot provide them. Returns True when the shim is active."""
    global _LIBRARY
    if _LIBRARY is not None or _operator_exists("nms"):
        return _LIBRARY is not None
    extension = _torchvision_c_extension()
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
        except (OSError, RuntimeError):
            pass
        if _operator_exists("nms"):
            return False
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    for name in ("nms", "qnms"):
        _LIBRARY.define(f"{name}{_SCHEMA}")
        _LIBRARY.impl(name, nms_reference, "CPU")
    return True


SHIM_ACTIVE = install()


def enable_torchvision_ops_nms() -> None:
    """Let ``torchvision.ops.nms`` / ``batched_nms`` call the shim (they refuse while ``_C`` is missing).

    Imports torchvision; only needed by code that runs NMS itself (e.g. the YOLO baseline).
    """
    if not SHIM_ACTIVE:
        return
    import torchvision.ops.boxes as boxes

    boxes._assert_has_ops = lambda: None

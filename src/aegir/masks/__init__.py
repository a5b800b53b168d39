"""The Mask Factory: prompt-conditioned mask backends and the registry that names them.

Backends (each a factory taking keyword options and returning a :class:`~aegir.masks.base.MaskBackend`):
``offline`` (joint GrabCut, :mod:`.offline`), ``sam`` / ``sam-hq`` / ``sam2`` (segment-geospatial, :mod:`.sam`;
heavy packages imported only when built) and ``model`` (a trained checkpoint of this project,
:mod:`.model_refiner`). The interface and result type are in :mod:`.base`; no backend module imports this one.
"""

from __future__ import annotations

from typing import Any, Callable

from aegir.masks import model_refiner, offline, sam
from aegir.masks.base import MaskBackend

BackendFactory = Callable[..., MaskBackend]
_REGISTRY: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    """Register a backend factory (a class or function taking keyword options) under ``name``."""
    _REGISTRY[name] = factory


def available_backends() -> list[str]:
    """Registered backend names."""
    return sorted(_REGISTRY)


def get_backend(name: str, **options: Any) -> MaskBackend:
    """The backend ``name`` built with ``options`` (e.g. ``checkpoint=...``); unknown names → ValueError."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown mask backend {name!r}; backends: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**options)


register_backend("offline", offline.OfflineGrabCutBackend)
register_backend("sam", sam.sam_backend)
register_backend("sam-hq", sam.sam_hq_backend)
register_backend("sam2", sam.sam2_backend)
register_backend("model", model_refiner.model_backend)

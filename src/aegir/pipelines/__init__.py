"""Hamilton driver wrapper: which dataflow modules make which outputs (``STAGES``), and how a job runs them.

The jobs live in one module per job (:mod:`.labels`, :mod:`.dataset`, :mod:`.masks`, :mod:`.plan`,
:mod:`.embeddings`, :mod:`.region`, :mod:`.flywheel`, …). Each job reads through the store layer, runs a Hamilton
DAG of pure functions, and writes through the store layer; dataflows receive data as input nodes and do no I/O.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from hamilton import base, driver

from aegir.dataflows import (
    backfill,
    chip_embeddings,
    embedding_hooks,
    grid_plan,
    label_import,
    label_prompts,
    mask_factory,
    region_inference,
    s2_indexing,
    tile_embeddings,
    training_sample_builder,
    validation,
)
from aegir.store import run_files

STAGES: dict[str, tuple[ModuleType, ...]] = {
    "label_import": (label_import, s2_indexing),
    "prompts": (label_prompts,),
    "training_samples": (training_sample_builder,),
    "mask_factory": (mask_factory,),
    "grid_plan": (grid_plan,),
    "region_inference": (region_inference,),
    "validation": (validation,),
    "backfill": (backfill,),
    "chip_embeddings": (chip_embeddings,),
    "tile_embeddings": (tile_embeddings,),
    "embedding_hooks": (embedding_hooks,),
}


def build_driver(modules: Sequence[ModuleType], config: dict[str, Any] | None = None) -> driver.Driver:
    """A Hamilton driver over ``modules`` whose ``execute`` returns a dict of the requested outputs."""
    return (
        driver.Builder()
        .with_modules(*modules)
        .with_config(config or {})
        .with_adapters(base.DictResult())
        .build()
    )


def run_stage(stage: str, outputs: Iterable[str], inputs: dict[str, Any]) -> dict[str, Any]:
    """Execute ``outputs`` of one named stage with ``inputs``; returns {output name: value}."""
    if stage not in STAGES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return build_driver(STAGES[stage]).execute(list(outputs), inputs=inputs)


def write_dag_image(path: str | Path, stages: Sequence[str] | None = None) -> Path:
    """Write the DAG of ``stages`` (all by default): ``.dot`` as Graphviz source, other suffixes rendered by ``dot``.

    Needs the ``graphviz`` Python package (extra ``dag``); rendering also needs the Graphviz ``dot`` binary.
    """
    try:
        import graphviz  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("`aegir dag` needs graphviz: pip install 'aegir-lightning-lance[dag]'") from exc
    modules = sorted({m for name in (stages or STAGES) for m in STAGES[name]}, key=lambda m: m.__name__)
    return run_files.write_graphviz(build_driver(modules).display_all_functions(), path)

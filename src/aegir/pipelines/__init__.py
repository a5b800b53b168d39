"""Hamilton driver wrapper: which dataflow modules make which outputs (``STAGES``), and how a job runs them.

The jobs live in one module per job (:mod:`.labels`, :mod:`.dataset`, :mod:`.masks`, :mod:`.plan`,
:mod:`.embeddings`, :mod:`.region`, :mod:`.flywheel`, …). Each job reads through the store layer, runs a Hamilton
DAG of pure functions, and writes through the store layer; dataflows receive data as input nodes and do no I/O.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Sequence

from hamilton import base, driver

from aegir.dataflows import (
    backfill,
    capacity_fit,
    chip_embeddings,
    embedding_hooks,
    grid_plan,
    imagery_catalog,
    installations,
    label_image_join,
    label_import,
    lakehouse_samples,
    label_prompts,
    mask_factory,
    mask_labels,
    pseudo_labels,
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
    "imagery_catalog": (imagery_catalog,),
    "label_image_join": (label_image_join,),
    "lakehouse_samples": (lakehouse_samples,),
    "training_samples": (training_sample_builder,),
    "mask_factory": (mask_factory,),
    "mask_labels": (mask_labels,),
    "grid_plan": (grid_plan,),
    "region_inference": (region_inference,),
    "installations": (installations,),
    "capacity_fit": (capacity_fit,),
    "validation": (validation,),
    "backfill": (backfill,),
    "pseudo_labels": (pseudo_labels,),
    "chip_embeddings": (chip_embeddings,),
    "tile_embeddings": (tile_embeddings,),
    "embedding_hooks": (embedding_hooks,),
}


class _HamiltonErrorBanner(logging.Filter):
    """Drops what Hamilton logs when a run fails: the "Oh no an error! … join our slack" banner
    (``hamilton.driver``) and the node-failure dump with its traceback (``hamilton.execution.graph_functions``).

    The exception itself still propagates to the job's caller, which reports it (the CLI: one ``error:`` line naming
    the file and the problem); without this filter Python's last-resort handler prints both onto stderr.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "hamilton.driver":
            return "join our slack" not in str(record.msg).lower()
        return record.exc_info is None  # graph_functions: the failed node's inputs + traceback


_HAMILTON_FILTER = _HamiltonErrorBanner()
for _name in ("hamilton.driver", "hamilton.execution.graph_functions"):
    if _HAMILTON_FILTER not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_HAMILTON_FILTER)


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

"""Hamilton dataflow: a batch of ``training_data`` chips → rows of the Lance ``predictions`` table.

Inputs: ``chip_batch`` (Arrow table with ``uuid``, ``vhr_image_chip`` and ``metadata`` of ``training_data``),
``predict_proba`` (a (C, H, W) chip → (H, W) float32 PV probability in [0, 1], e.g.
:meth:`aegir.training.inference_model.SegmentationModel.predict_proba`), ``pv_threshold`` and ``prediction_context``
(``checkpoint``, ``model_data_version``, ``source_uri``, ``source_version``, ``predicted_at``: the same for every row
of one run). Output ``prediction_rows`` in :data:`aegir.store.lance_fragments.PREDICTIONS_SCHEMA`: per chip the
mask (uint8 0/1), the probability quantised to uint8 (round(p × 255)), both raw C-order (H, W), and the PV fraction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from aegir.store.chip_codec import decode_chip
from aegir.store.lance_fragments import PREDICTIONS_SCHEMA

PredictProba = Callable  # (C, H, W) chip -> (H, W) float32; bare: Hamilton checks the type with isinstance


def chip_images(chip_batch: pa.Table) -> list[np.ndarray]:
    """(C, H, W) pixel arrays of the batch's ``vhr_image_chip`` column, decoded as their metadata says."""
    metas = chip_batch.column("metadata").to_pylist()
    buffers = chip_batch.column("vhr_image_chip").to_pylist()
    return [decode_chip(b, m["vhr_encoding"], m["vhr_shape"], m["vhr_dtype"]) for b, m in zip(buffers, metas)]


def chip_probabilities(chip_images: list[np.ndarray], predict_proba: PredictProba) -> list[np.ndarray]:
    """(H, W) float32 PV probability of every chip."""
    return [np.asarray(predict_proba(image), dtype=np.float32) for image in chip_images]


def prediction_rows(
    chip_batch: pa.Table,
    chip_probabilities: list[np.ndarray],
    pv_threshold: float,
    prediction_context: dict[str, Any],
) -> pa.Table:
    """One predictions row per chip: mask (p ≥ ``pv_threshold``), quantised probability, PV fraction, provenance."""
    masks = [(p >= pv_threshold).astype(np.uint8) for p in chip_probabilities]
    n = len(masks)
    columns = {
        "uuid": chip_batch.column("uuid").to_pylist(),
        "pv_mask": [m.tobytes(order="C") for m in masks],
        "pv_probability": [np.rint(np.clip(p, 0, 1) * 255).astype(np.uint8).tobytes(order="C")
                           for p in chip_probabilities],
        "mask_shape": [list(m.shape) for m in masks],
        "pv_fraction": [float(m.mean()) if m.size else 0.0 for m in masks],
        "threshold": [float(pv_threshold)] * n,
        **{key: [prediction_context[key]] * n for key in
           ("checkpoint", "model_data_version", "source_uri", "source_version", "predicted_at")},
    }
    return pa.table(columns, schema=PREDICTIONS_SCHEMA)

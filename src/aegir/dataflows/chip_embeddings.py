"""Hamilton dataflow: a batch of ``training_data`` chips → rows of the LanceDB ``chip_embeddings`` table.

Inputs: ``chip_batch`` (Arrow table with ``uuid``, ``vhr_image_chip`` and ``metadata`` of ``training_data``),
``encode_chips`` (``(B, C, H, W)`` raw chips → ``(B, D)`` float32, e.g.
:meth:`aegir.training.embedder.ChipEncoder.encode`) and ``embedding_context`` (``model``, ``model_checkpoint``,
``model_data_version``, ``source_table``, ``source_version``, ``embedded_at``: the same for every row of one run).
Output ``embedding_rows`` in :func:`aegir.store.embedding_store.embeddings_schema`: one L2-normalised vector per
chip plus copies of the metadata fields that searches filter on (dataset, S2 tokens, acquisition time).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa

from aegir.store.chip_codec import decode_chip
from aegir.store.embedding_store import FILTER_COPIES, embeddings_schema

EncodeChips = Callable  # (B, C, H, W) -> (B, D); bare: Hamilton checks the type with isinstance


def chip_images(chip_batch: pa.Table) -> list[np.ndarray]:
    """(C, H, W) pixel arrays of the batch's ``vhr_image_chip`` column, decoded as their metadata says."""
    metas = chip_batch.column("metadata").to_pylist()
    buffers = chip_batch.column("vhr_image_chip").to_pylist()
    return [decode_chip(b, m["vhr_encoding"], m["vhr_shape"], m["vhr_dtype"]) for b, m in zip(buffers, metas)]


def normalised_vectors(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1)).astype(np.float32)


def chip_embedding_vectors(chip_images: list[np.ndarray], encode_chips: EncodeChips) -> np.ndarray:
    """(N, D) unit-length float32 embedding of every chip; chips are encoded in groups of equal shape."""
    if not chip_images:
        return np.zeros((0, 0), dtype=np.float32)
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(chip_images):
        groups.setdefault((image.shape, image.dtype.str), []).append(i)
    out: np.ndarray | None = None
    for indices in groups.values():
        vectors = np.asarray(encode_chips(np.stack([chip_images[i] for i in indices])), dtype=np.float32)
        if out is None:
            out = np.zeros((len(chip_images), vectors.shape[1]), dtype=np.float32)
        out[indices] = vectors
    return normalised_vectors(out)


def embedding_rows(
    chip_batch: pa.Table, chip_embedding_vectors: np.ndarray, embedding_context: dict[str, Any]
) -> pa.Table:
    """One ``chip_embeddings`` row per chip: uuid, model, vector, provenance and the filter fields."""
    n, dim = chip_embedding_vectors.shape
    schema = embeddings_schema(dim)
    metas = chip_batch.column("metadata").to_pylist()
    flat = pa.array(chip_embedding_vectors.reshape(-1), type=pa.float32())
    columns: dict[str, Any] = {
        "uuid": chip_batch.column("uuid").to_pylist(),
        "model": [embedding_context["model"]] * n,
        "vector": pa.FixedSizeListArray.from_arrays(flat, dim),
        **{key: [embedding_context[key]] * n for key in
           ("model_checkpoint", "model_data_version", "source_table", "source_version", "embedded_at")},
        **{name: [m.get(name) for m in metas] for name in FILTER_COPIES},
    }
    return pa.table(columns, schema=schema)

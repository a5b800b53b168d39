"""Arrow record batches of ``training_data`` → torch tensors (the ``to_tensor_fn`` for ``lance.torch.data``).

Fixed-shape ``raw`` chips of a batch are decoded with one ``np.frombuffer`` over the binary column's data
buffer (no per-row Python work); ``png``/``tiff`` rows are decoded one by one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from aegir.store.chip_codec import decode_chip
from aegir.store.lance_io import MASK_IGNORE, training_mask


def _column(batch: pa.RecordBatch | dict, name: str) -> pa.Array:
    array = batch[name]
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def _raw_block(array: pa.BinaryArray, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    """All rows as one (B, *shape) array when every row holds exactly one raw chip of that shape, else None."""
    item = int(np.prod(shape)) * dtype.itemsize
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    if array.null_count or not np.all(np.diff(offsets) == item):
        return None
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data.view(dtype).reshape((len(array), *shape))


def decode_chip_column(array: pa.BinaryArray, encodings: list[str], shapes: list[list[int]], dtypes: list[str]) -> np.ndarray:
    """(B, *shape) array of one chip column; rows must share shape and dtype."""
    shape, dtype = tuple(shapes[0]), np.dtype(dtypes[0])
    if any(tuple(s) != shape for s in shapes) or any(d != dtypes[0] for d in dtypes):
        raise ValueError(f"chips of one batch must share shape/dtype; got {sorted({tuple(s) for s in shapes})}")
    if all(e == "raw" for e in encodings):
        block = _raw_block(array, shape, dtype)
        if block is not None:
            return block
    return np.stack([decode_chip(b, e, shape, dtype) for b, e in zip(array.to_pylist(), encodings)])


def training_batch_to_tensors(batch: pa.RecordBatch | dict, mask_target: str = "auto", **_: Any
                              ) -> dict[str, torch.Tensor]:
    """``image`` (B, C, H, W) uint8/float and ``mask`` (B, H, W) uint8 (0/1, ``MASK_IGNORE`` where a pseudo-label
    has no opinion) from a batch with ``vhr_image_chip``,
    ``generated_mask`` (and ``truth_mask``) and ``metadata`` columns; ``mask_target`` picks the mask
    (:func:`aegir.store.lance_io.training_mask`: by default the truth where a row has it)."""
    meta = _column(batch, "metadata")
    image = decode_chip_column(
        _column(batch, "vhr_image_chip"),
        meta.field("vhr_encoding").to_pylist(),
        meta.field("vhr_shape").to_pylist(),
        meta.field("vhr_dtype").to_pylist(),
    )
    mask = decode_chip_column(
        training_mask(batch, mask_target),
        meta.field("mask_encoding").to_pylist(),
        meta.field("mask_shape").to_pylist(),
        ["uint8"] * len(meta),
    )
    labels = np.where(mask == MASK_IGNORE, MASK_IGNORE, mask > 0).astype(np.uint8)  # png masks are 0/255
    return {"image": torch.from_numpy(np.array(image)), "mask": torch.from_numpy(labels)}

"""Chip bytes in the ``training_data`` table: ``raw`` (C-order array bytes), ``png`` or ``tiff``.

``raw`` is the default: a fixed-shape chip decodes with one ``np.frombuffer`` (see ``bench/loader.py`` for the
measured difference); ``png`` is lossless and ~2–3× smaller for RGB uint8; ``tiff`` (deflate) keeps any dtype and
band count. Arrays are (C, H, W) for images and (H, W) for masks; shape and dtype live in the row's metadata.
"""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image
from rasterio.errors import NotGeoreferencedWarning

from aegir.store.lance_io import CHIP_ENCODINGS


def encode_raw_array(arr: np.ndarray) -> bytes:
    """C-order raw bytes of ``arr`` (pair with its shape and dtype in the metadata)."""
    return np.ascontiguousarray(arr).tobytes(order="C")


def decode_raw_array(buf: bytes, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
    """A writable array of ``shape``/``dtype`` from C-order raw bytes; a size mismatch raises ValueError."""
    dtype = np.dtype(dtype)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise ValueError(f"{len(buf)} bytes do not hold a {tuple(shape)} {dtype} array ({expected} bytes)")
    return np.frombuffer(buf, dtype=dtype).reshape(tuple(shape)).copy()


def _check_encoding(encoding: str) -> None:
    if encoding not in CHIP_ENCODINGS:
        raise ValueError(f"unknown chip encoding {encoding!r}; use one of {', '.join(CHIP_ENCODINGS)}")


def _encode_png(array: np.ndarray) -> bytes:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.dtype == np.uint8:
        image = Image.fromarray(array[0] if array.shape[0] == 1 else np.moveaxis(array, 0, -1))
    elif array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        image = Image.fromarray(array)
    else:
        raise ValueError(f"png holds uint8 (1/3/4, H, W) or (H, W) uint8/uint16 arrays, not {array.shape} {array.dtype}")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _encode_tiff(array: np.ndarray) -> bytes:
    from rasterio.io import MemoryFile

    bands = array[None] if array.ndim == 2 else array
    profile = {"driver": "GTiff", "width": bands.shape[2], "height": bands.shape[1], "count": bands.shape[0],
               "dtype": bands.dtype.name, "compress": "deflate"}
    with warnings.catch_warnings(), MemoryFile() as memfile:
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # chips carry their grid in the row metadata
        with memfile.open(**profile) as dataset:
            dataset.write(bands)
        return memfile.read()


def encode_chip(array: np.ndarray, encoding: str = "raw") -> bytes:
    """Bytes of a (C, H, W) image or (H, W) mask in ``encoding``."""
    _check_encoding(encoding)
    if encoding == "raw":
        return encode_raw_array(array)
    return _encode_png(array) if encoding == "png" else _encode_tiff(array)


def decode_chip(buffer: bytes, encoding: str, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
    """The array stored by :func:`encode_chip`, as ``shape``/``dtype`` (a size mismatch raises ValueError)."""
    _check_encoding(encoding)
    if encoding == "raw":
        return decode_raw_array(buffer, shape, dtype)
    if encoding == "png":
        array = np.asarray(Image.open(io.BytesIO(buffer)))
        array = np.moveaxis(array, -1, 0) if array.ndim == 3 else array
    else:
        from rasterio.io import MemoryFile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with MemoryFile(buffer) as memfile, memfile.open() as dataset:
                array = dataset.read()
    array = array.reshape(tuple(shape)) if array.size == int(np.prod(shape)) else array
    if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
        raise ValueError(f"decoded {encoding} chip is {array.shape} {array.dtype}, metadata says {tuple(shape)} {dtype}")
    return array

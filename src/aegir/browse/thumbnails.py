"""PNG thumbnails of ``training_data`` rows: the chip with its mask tinted and outlined (pure: bytes out)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from affine import Affine
from PIL import Image

from aegir.store.chip_codec import decode_chip
from aegir.utils.geo import PIXEL_GRID_CRS
from aegir.utils.quicklook import mask_overlay, outline
from aegir.utils.types import Chip

THUMB_PX = 160  # longest side of a thumbnail
OUTLINE_COLOUR = np.array([255, 0, 255], dtype=np.uint8)


def thumbnail_size(height: int, width: int, longest: int = THUMB_PX) -> tuple[int, int]:
    """(width, height) of the thumbnail of a ``height`` × ``width`` chip."""
    scale = longest / max(height, width)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _rgb(row: dict[str, Any]) -> np.ndarray:
    meta = row["metadata"]
    pixels = decode_chip(row["vhr_image_chip"], meta["vhr_encoding"], meta["vhr_shape"], meta["vhr_dtype"])
    chip = Chip(pixels, PIXEL_GRID_CRS, Affine.identity(), float("nan"),
                tuple(f"b{i}" for i in range(pixels.shape[0])), meta["source_file"])
    return np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1))


def _mask(row: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    meta = row["metadata"]
    stored = row.get("truth_mask") or row["generated_mask"]  # the training target: truth where the row has it
    if stored is None:
        return None
    mask = decode_chip(stored, meta["mask_encoding"], meta["mask_shape"], "uint8")
    small = Image.fromarray(((mask > 0) * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    return np.asarray(small) > 127


def row_thumbnail(row: dict[str, Any], longest: int = THUMB_PX) -> bytes:
    """PNG bytes: the row's chip scaled to ``longest`` px, PV pixels tinted magenta and outlined."""
    rgb = _rgb(row)
    size = thumbnail_size(rgb.shape[0], rgb.shape[1], longest)
    small = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
    mask = _mask(row, size)
    if mask is not None and mask.any():
        small = outline(mask_overlay(small, mask, alpha=0.35), mask, OUTLINE_COLOUR)
    buffer = io.BytesIO()
    Image.fromarray(small).save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()

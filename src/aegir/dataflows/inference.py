"""Hamilton dataflow: tiled inference with overlap blending (no seams) over one image or mosaic window.

A region is cut into ``tile_px``² tiles that overlap by ``overlap_px``; each tile's PV probabilities are
weighted by a separable window that is 1 in the tile's core and falls smoothly (raised cosine) to ~0 at its
edges, then accumulated and divided by the summed weights. Pixels near a tile edge, where a CNN sees
truncated context, therefore count little wherever a neighbouring tile sees them in its core, so tile borders
leave no seams. The image borders of the region keep full weight (there is no other tile to take over).

Shapes: ``image`` (C, H, W); probabilities (H, W) float32 in [0, 1]. ``predict_tiles`` maps a (B, C, t, t)
array to (B, t, t) probabilities (any model: see :mod:`aegir.training` for the trained one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

PredictTiles = Callable[[np.ndarray], np.ndarray]


def _starts(length: int, tile_px: int, stride: int) -> list[int]:
    """Tile starts along one axis covering ``length`` with the last tile flush with the end."""
    if length <= tile_px:
        return [0]
    starts = list(range(0, length - tile_px, stride))
    return starts + [length - tile_px]


def _tile_origins(image_shape: tuple[int, ...], tile_px: int, overlap_px: int) -> list[tuple[int, int]]:
    """(row, col) of every tile's top-left pixel; tiles overlap by at least ``overlap_px``."""
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must lie in [0, tile_px), got {overlap_px} for tile_px {tile_px}")
    height, width = image_shape[-2:]
    stride = tile_px - overlap_px
    return [(r, c) for r in _starts(height, tile_px, stride) for c in _starts(width, tile_px, stride)]


def _ramp(tile_px: int, overlap_px: int) -> np.ndarray:
    """1-D weights: raised-cosine rise over ``overlap_px`` pixels at each end, 1 in between, never exactly 0."""
    weights = np.ones(tile_px, dtype=np.float64)
    if overlap_px:
        rise = 0.5 - 0.5 * np.cos(np.pi * (np.arange(overlap_px) + 0.5) / overlap_px)
        weights[:overlap_px] = rise
        weights[-overlap_px:] = rise[::-1]
    return np.maximum(weights, 1e-6)


def _tile_weights(
    origin: tuple[int, int], image_shape: tuple[int, ...], tile_px: int, overlap_px: int
) -> np.ndarray:
    """(t, t) blending weights of the tile at ``origin``; sides on the image border keep full weight."""
    height, width = image_shape[-2:]
    ramp = _ramp(tile_px, overlap_px)
    rows, cols = ramp.copy(), ramp.copy()
    row, col = origin
    if row == 0:
        rows[: tile_px // 2] = 1.0
    if row + tile_px >= height:
        rows[tile_px // 2 :] = 1.0
    if col == 0:
        cols[: tile_px // 2] = 1.0
    if col + tile_px >= width:
        cols[tile_px // 2 :] = 1.0
    return np.outer(rows, cols)


def _pad_to_tile(image: np.ndarray, tile_px: int) -> np.ndarray:
    """Reflect-pad an image smaller than one tile up to the tile size (bottom/right)."""
    pad_h, pad_w = max(tile_px - image.shape[-2], 0), max(tile_px - image.shape[-1], 0)
    if not (pad_h or pad_w):
        return image
    mode = "reflect" if min(image.shape[-2:]) > 1 else "edge"
    return np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode=mode)


def _batches(origins: list[tuple[int, int]], batch_size: int) -> Iterator[list[tuple[int, int]]]:
    for start in range(0, len(origins), batch_size):
        yield origins[start : start + batch_size]


def blended_probabilities(
    image: np.ndarray,
    predict_tiles: PredictTiles,
    tile_px: int = 256,
    overlap_px: int = 64,
    batch_size: int = 8,
    valid: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W) float32 PV probabilities of ``image`` (C, H, W) from overlapping tiles, blended without seams.

    ``valid`` ((H, W) bool, optional): tiles without a single valid pixel are not predicted and pixels outside
    ``valid`` get probability 0 (every valid pixel lies only in predicted tiles, so its blend is unchanged).
    """
    height, width = image.shape[-2:]
    padded = _pad_to_tile(image, tile_px)
    origins = _tile_origins(padded.shape, tile_px, overlap_px)
    total = np.zeros(padded.shape[-2:], dtype=np.float64)
    weight_sum = np.zeros_like(total)
    if valid is not None:
        padded_valid = _pad_to_tile(np.asarray(valid, bool)[None], tile_px)[0]
        for row, col in origins:
            weights = _tile_weights((row, col), padded.shape, tile_px, overlap_px)
            weight_sum[row : row + tile_px, col : col + tile_px] += weights
        origins = [(r, c) for r, c in origins if padded_valid[r : r + tile_px, c : c + tile_px].any()]
    for group in _batches(origins, batch_size):
        tiles = np.stack([padded[:, r : r + tile_px, c : c + tile_px] for r, c in group])
        probabilities = np.asarray(predict_tiles(tiles), dtype=np.float64)
        if probabilities.shape != (len(group), tile_px, tile_px):
            raise ValueError(f"predict_tiles returned {probabilities.shape}, expected {(len(group), tile_px, tile_px)}")
        for (row, col), tile_probability in zip(group, probabilities):
            weights = _tile_weights((row, col), padded.shape, tile_px, overlap_px)
            total[row : row + tile_px, col : col + tile_px] += weights * tile_probability
            if valid is None:
                weight_sum[row : row + tile_px, col : col + tile_px] += weights
    blended = (total / weight_sum)[:height, :width].astype(np.float32)
    return blended if valid is None else np.where(valid, blended, np.float32(0))


def pv_mask(blended_probabilities: np.ndarray, pv_threshold: float = 0.5) -> np.ndarray:
    """(H, W) uint8 0/1 mask: probability ≥ ``pv_threshold``."""
    return (blended_probabilities >= pv_threshold).astype(np.uint8)

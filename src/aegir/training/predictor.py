"""The one tiled predictor: PV probabilities of an image of any size from overlapping model tiles, predicted in
batches and blended without seams.

An image is cut into tiles of ``tile_px``² pixels (an image smaller than ``tile_px`` along an axis is one tile
of its own length there: the model pads as it needs) that overlap by at least ``overlap_px``; tiles go to the
model ``batch_size`` at a time. Each tile's probabilities are weighted by a separable window that is 1 in the
tile's core, rises smoothly (raised cosine) across the overlap and is ~0 within ``margin_px`` of its edges; the
weighted sum is divided by the summed weights. Pixels near a tile edge, where a CNN sees truncated context,
therefore do not count wherever a neighbouring tile sees them in its core, so tile borders leave no seams. Tile sides on the image border keep
full weight (no other tile takes over there); an image that fits in one tile is predicted in one whole pass.

Shapes: ``image`` (C, H, W) (uint8 RGB or float MSI, raw as the model takes it); probabilities (H, W) float32 in
[0, 1]. A batch predictor maps (B, C, h, w) tiles to (B, h, w) probabilities. Pure numpy: no torch import.

Image-level input statistics: a model whose network standardises every input by its own mean / std
(``normalization = "per_image"``) would see each tile with different statistics, and the tiles would disagree
where they meet. Such a model offers ``standardized(image, valid) -> (C, H, W)`` (the whole image standardised
once, over its valid pixels) and ``predict_standardized(tiles)``; :func:`image_predictor` picks that pair, so
every tile of one image is normalised alike and tiled == whole-image inference holds for it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

PredictTiles = Callable[[np.ndarray], np.ndarray]  # (B, C, h, w) tiles -> (B, h, w) probabilities
DEFAULT_TILE_PX, DEFAULT_OVERLAP_PX, DEFAULT_BATCH_SIZE = 1024, 288, 4  # a trained model's own tiling
RAMP_PX = 64  # the raised-cosine ramp of the default margin (see default_margin_px)


def tile_predictor(model: Any) -> PredictTiles:
    """The batch predictor of ``model``: its ``predict_batch``, else its ``predict_proba`` ((C, h, w) → (h, w))
    tile by tile, else ``model`` itself when it is a plain callable."""
    if hasattr(model, "predict_batch"):
        return model.predict_batch
    if hasattr(model, "predict_proba"):
        return lambda tiles: np.stack([model.predict_proba(tile) for tile in tiles])
    if callable(model):
        return model
    raise TypeError(f"{type(model).__name__} is neither a batch predictor nor has predict_batch / predict_proba")


PrepareImage = Callable[[np.ndarray, "np.ndarray | None"], np.ndarray]  # (C, H, W), valid (H, W) -> (C, H, W)


def _unchanged(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    return image


def image_predictor(model: Any) -> tuple[PrepareImage, PredictTiles]:
    """(prepare, predict_tiles) of ``model``: its ``standardized`` + ``predict_standardized`` when it has them
    (image-level statistics, see the module docstring), else the image unchanged + :func:`tile_predictor`."""
    if hasattr(model, "standardized") and hasattr(model, "predict_standardized"):
        return model.standardized, model.predict_standardized
    return _unchanged, tile_predictor(model)


def _starts(length: int, tile: int, stride: int) -> list[int]:
    """Tile starts along one axis covering ``length`` px, the last tile flush with the end."""
    if length <= tile:
        return [0]
    return list(range(0, length - tile, stride)) + [length - tile]


def _tile_shape(image_shape: tuple[int, ...], tile_px: int) -> tuple[int, int]:
    """(h, w) of every tile: ``tile_px`` clamped to the image's height and width."""
    return min(tile_px, image_shape[-2]), min(tile_px, image_shape[-1])


def default_margin_px(overlap_px: int) -> int:
    """The default ``margin_px`` of an overlap: a :data:`RAMP_PX` ramp in the middle of the overlap, the rest on
    both sides left out of the blend ((overlap_px - 64) // 2, at least 0: 112 px of a 288 px overlap).

    Measured on the 1280² Austin block, the flywheel's round-0 U-Net (48 steps), tiled vs whole-image inference:
    512 px tiles / 64 overlap / no margin: max |Δp| 0.47, 9.1 % of pixels more than one uint8 level off;
    1024 / 224 / 80: max 0.043, 0.11 %; 1024 / 288 / 112 (the default): max 0.0021, none. How far a model's
    context reaches is the model's own: a U-Net with a longer reach (another seed's round 1) is still 0.06 off
    at 288 / 112 and needs a larger overlap to blend within one level."""
    return max(0, (overlap_px - RAMP_PX) // 2)


def checked_margin_px(overlap_px: int, margin_px: int | None) -> int:
    """``margin_px`` (None: :func:`default_margin_px`); ValueError unless 0 <= 2 * margin_px < overlap_px (or
    both are 0)."""
    margin_px = default_margin_px(overlap_px) if margin_px is None else int(margin_px)
    if margin_px < 0 or (overlap_px and 2 * margin_px >= overlap_px) or (not overlap_px and margin_px):
        raise ValueError(f"margin_px must lie in [0, overlap_px / 2), got {margin_px} for overlap_px {overlap_px}")
    return margin_px


def _tile_origins(image_shape: tuple[int, ...], tile_px: int, overlap_px: int) -> list[tuple[int, int]]:
    """(row, col) of every tile's top-left pixel; neighbouring tiles overlap by at least ``overlap_px``."""
    if not 0 <= overlap_px < tile_px:
        raise ValueError(f"overlap_px must lie in [0, tile_px), got {overlap_px} for tile_px {tile_px}")
    (height, width), (tile_h, tile_w) = image_shape[-2:], _tile_shape(image_shape, tile_px)
    stride = tile_px - overlap_px
    return [(r, c) for r in _starts(height, tile_h, stride) for c in _starts(width, tile_w, stride)]


def _axis_weights(start: int, tile: int, length: int, overlap_px: int, margin_px: int = 0) -> np.ndarray:
    """(tile,) weights along one axis: ~0 (1e-6) over the ``margin_px`` px at each end, a raised-cosine rise over
    the next ``overlap_px - 2 * margin_px`` px, 1 in between; the half of the tile on an image border keeps
    weight 1. Two tiles overlapping by exactly ``overlap_px`` sum to 1 in the overlap, and neither counts within
    ``margin_px`` of its own edge, where a CNN's truncated context shows."""
    weights = np.ones(tile, dtype=np.float64)
    if tile >= length:
        return weights
    if overlap_px:
        ramp = overlap_px - 2 * margin_px
        rise = np.clip((np.arange(overlap_px) - margin_px + 0.5) / ramp, 0.0, 1.0)
        rise = np.sin(0.5 * np.pi * rise) ** 2
        weights[:overlap_px], weights[-overlap_px:] = rise, rise[::-1]
    weights = np.maximum(weights, 1e-6)
    if start == 0:
        weights[: tile // 2] = 1.0
    if start + tile >= length:
        weights[tile // 2 :] = 1.0
    return weights


def _tile_weights(origin: tuple[int, int], tile_shape: tuple[int, int], image_shape: tuple[int, ...],
                  overlap_px: int, margin_px: int = 0) -> np.ndarray:
    """(h, w) blending weights of the tile at ``origin``."""
    row, col = origin
    return np.outer(_axis_weights(row, tile_shape[0], image_shape[-2], overlap_px, margin_px),
                    _axis_weights(col, tile_shape[1], image_shape[-1], overlap_px, margin_px))


def predicted_tiles(predict_tiles: PredictTiles, batch: np.ndarray) -> np.ndarray:
    """(B, h, w) float64 probabilities of a (B, C, h, w) ``batch``; ValueError when the model returns another
    shape."""
    probabilities = np.asarray(predict_tiles(batch), dtype=np.float64)
    expected = (batch.shape[0], *batch.shape[-2:])
    if probabilities.shape != expected:
        raise ValueError(f"the model returned {probabilities.shape} for tiles {batch.shape}, expected {expected}")
    return probabilities


class TileBlend:
    """The blend of one image's overlapping tiles, filled in any order and by any batching: :meth:`tiles` says which
    tiles to predict, :meth:`add` accumulates each tile's (h, w) probabilities, :meth:`probabilities` divides by
    the summed weights. Several blends can share one batch stream (tiles of many cells in one network pass), and
    every pixel ends with the same value as :func:`blended_probabilities` gives it.

    ``image_shape``: (C, H, W) or (H, W); ``valid`` ((H, W) bool, optional): tiles without a valid pixel are not
    listed and pixels outside ``valid`` end at probability 0; ``margin_px``: the px at each interior tile edge
    that count ~0 (see :func:`_axis_weights`; ``overlap_px - 2 * margin_px`` must stay >= 1; None:
    :func:`default_margin_px`)."""

    def __init__(self, image_shape: tuple[int, ...], tile_px: int, overlap_px: int,
                 valid: np.ndarray | None = None, margin_px: int | None = None) -> None:
        margin_px = checked_margin_px(overlap_px, margin_px)
        self.shape, self.overlap_px, self.margin_px = tuple(image_shape[-2:]), overlap_px, margin_px
        self.tile = _tile_shape(image_shape, tile_px)
        origins = _tile_origins(image_shape, tile_px, overlap_px)
        self.total = np.zeros(self.shape, dtype=np.float64)
        self.weight_sum = np.zeros_like(self.total)
        for row, col in origins:  # every tile's weight counts, predicted or not (see ``valid``)
            self.weight_sum[row : row + self.tile[0], col : col + self.tile[1]] += self._weights((row, col))
        self.valid = None if valid is None else np.asarray(valid, bool)
        if self.valid is not None:
            origins = [(r, c) for r, c in origins if self.valid[r : r + self.tile[0], c : c + self.tile[1]].any()]
        self.origins = origins
        self.pending = len(origins)

    def _weights(self, origin: tuple[int, int]) -> np.ndarray:
        return _tile_weights(origin, self.tile, self.shape, self.overlap_px, self.margin_px)

    def tiles(self, image: np.ndarray) -> Iterator[tuple[tuple[int, int], np.ndarray]]:
        """(origin (row, col), (C, h, w) view of ``image``) of every tile to predict."""
        for row, col in self.origins:
            yield (row, col), image[:, row : row + self.tile[0], col : col + self.tile[1]]

    def add(self, origin: tuple[int, int], probability: np.ndarray) -> None:
        """Accumulate one tile's (h, w) probabilities (weights built per tile: memory stays O(image))."""
        if probability.shape != self.tile:
            raise ValueError(f"the model returned {probability.shape} for a tile of {self.tile}")
        row, col = origin
        self.total[row : row + self.tile[0], col : col + self.tile[1]] += self._weights(origin) * probability
        self.pending -= 1

    def probabilities(self) -> np.ndarray:
        """(H, W) float32 blended probabilities (0 outside ``valid``)."""
        if self.pending:
            raise RuntimeError(f"{self.pending} tiles of the blend were never added")
        blended = (self.total / self.weight_sum).astype(np.float32)
        return blended if self.valid is None else np.where(self.valid, blended, np.float32(0))


def blended_probabilities(
    image: np.ndarray,
    predict: PredictTiles | Any,
    tile_px: int = DEFAULT_TILE_PX,
    overlap_px: int = DEFAULT_OVERLAP_PX,
    batch_size: int = DEFAULT_BATCH_SIZE,
    valid: np.ndarray | None = None,
    margin_px: int | None = None,
) -> np.ndarray:
    """(H, W) float32 PV probabilities of ``image`` (C, H, W) from overlapping tiles, blended without seams.

    ``predict``: a batch predictor or a model (see :func:`image_predictor`). ``valid`` ((H, W) bool, optional):
    tiles without a single valid pixel are not predicted and pixels outside ``valid`` get probability 0 (every
    valid pixel lies only in predicted tiles, so its blend is unchanged)."""
    prepare, predict_tiles = image_predictor(predict)
    blend = TileBlend(image.shape, tile_px, overlap_px, valid, margin_px)
    tiles = list(blend.tiles(prepare(image, valid)))
    for start in range(0, len(tiles), max(1, batch_size)):
        group = tiles[start : start + max(1, batch_size)]
        probabilities = predicted_tiles(predict_tiles, np.stack([tile for _, tile in group]))
        for (origin, _), probability in zip(group, probabilities):
            blend.add(origin, probability)
    return blend.probabilities()


def _view(image: np.ndarray, code: int) -> np.ndarray:
    """Dihedral view ``code`` (0..7: k = code % 4 quarter turns, then a left-right flip if code ≥ 4) of (…, H, W)."""
    out = np.rot90(image, code % 4, axes=(-2, -1))
    return np.flip(out, axis=-1) if code >= 4 else out


def _unview(probability: np.ndarray, code: int) -> np.ndarray:
    """The inverse of :func:`_view` on an (…, H', W') map."""
    out = np.flip(probability, axis=-1) if code >= 4 else probability
    return np.rot90(out, -(code % 4), axes=(-2, -1))


def view_probabilities(image: np.ndarray, predict_proba: Callable[[np.ndarray], np.ndarray],
                       views: tuple[int, ...] = (0, 7)) -> np.ndarray:
    """(V, H, W) float32 PV probabilities of a (C, H, W) image under test-time dihedral ``views`` (codes as in
    :func:`_view`; the default pair is the image and its transpose, code 7), each mapped back
    onto the image grid. ``predict_proba``: (C, H, W) → (H, W), e.g. ``SegmentationModel.predict_proba``."""
    return np.stack([np.ascontiguousarray(_unview(predict_proba(np.ascontiguousarray(_view(image, code))), code))
                     for code in views]).astype(np.float32)


D4_VIEWS = tuple(range(8))  # every dihedral view: 4 rotations × optional flip


def tta_predictor(predict: PredictTiles | Any, views: tuple[int, ...] = D4_VIEWS) -> PredictTiles:
    """A batch predictor averaging ``predict`` over dihedral test-time ``views`` (codes as in :func:`_view`):
    each view of the (B, C, h, w) batch is predicted and mapped back before the mean. ``views = (0,)`` is
    ``predict`` itself."""
    predict_tiles = tile_predictor(predict)
    if tuple(views) == (0,):
        return predict_tiles

    def averaged(tiles: np.ndarray) -> np.ndarray:
        total = np.zeros((tiles.shape[0], *tiles.shape[-2:]), dtype=np.float64)
        for code in views:
            viewed = np.asarray(predict_tiles(np.ascontiguousarray(_view(tiles, code))), dtype=np.float64)
            total += _unview(viewed, code)
        return (total / len(views)).astype(np.float32)

    return averaged

"""Prompts in pixel coordinates of one chip, and their conversion from georeferenced geometries.

Pixel coordinates follow rasterio (``aegir.utils.geo``): ``(col, row)`` = (x, y) with integers at pixel corners.
A box is ``(xmin, ymin, xmax, ymax)``; it covers the pixels whose centres lie inside it (at least one pixel per
axis). A point prompt is ``(x, y)``; backends segment the object under it. Georeferenced prompts (EPSG:4326
shapely geometries: polygons → their bounding box in the chip grid, points → points) are converted with the
chip's transform; a prompt wholly outside the chip raises :class:`PromptError`, one partly outside is clipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from aegir.utils import geo
from aegir.utils.types import Chip


class PromptError(ValueError):
    """A prompt cannot be used on this image (outside it, zero area, malformed)."""


@dataclass(frozen=True)
class PixelPrompts:
    """N prompts on an image of ``(height, width)``.

    ``boxes``: (N, 4) float (xmin, ymin, xmax, ymax), NaN rows for point prompts; ``points``: (N, 2) float (x, y),
    NaN rows for box prompts; ``ids``: a name per prompt (kept in outputs); ``clipped``: (N,) bool, True where a
    georeferenced prompt was clipped to the chip; ``priors``: None (no priors) or a tuple with one entry per prompt,
    each None or an (H, W) bool shape prior on the image grid (e.g. a rasterised label polygon). A prior is evidence
    for a backend, never the answer: backends may ignore it.
    """

    boxes: np.ndarray
    points: np.ndarray
    ids: tuple[str, ...]
    height: int
    width: int
    clipped: np.ndarray = field(default=None)  # type: ignore[assignment]
    priors: tuple[np.ndarray | None, ...] | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.boxes.shape != (n, 4) or self.points.shape != (n, 2):
            raise PromptError(f"prompt arrays disagree: {n} ids, boxes {self.boxes.shape}, points {self.points.shape}")
        if self.clipped is None:
            object.__setattr__(self, "clipped", np.zeros(n, bool))
        if self.priors is not None:
            object.__setattr__(self, "priors", _check_priors(self.priors, self.ids, self.height, self.width))

    def prior(self, index: int) -> np.ndarray | None:
        """(H, W) bool shape prior of a prompt, or None."""
        return None if self.priors is None else self.priors[index]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def is_box(self) -> np.ndarray:
        return ~np.isnan(self.boxes).any(axis=1)

    def pixel_slices(self, index: int, point_box_px: int = 48) -> tuple[slice, slice]:
        """(rows, cols) slices of the pixels a prompt covers; a point prompt covers a ``point_box_px`` square."""
        if self.is_box[index]:
            x0, y0, x1, y1 = self.boxes[index]
        else:
            x, y = self.points[index]
            half = point_box_px / 2.0
            x0, y0, x1, y1 = x - half, y - half, x + half, y + half
        return _span(y0, y1, self.height), _span(x0, x1, self.width)

    def region(self, index: int, point_box_px: int = 48) -> np.ndarray:
        """(H, W) bool: the pixels a prompt covers."""
        out = np.zeros((self.height, self.width), bool)
        rows, cols = self.pixel_slices(index, point_box_px)
        out[rows, cols] = True
        return out


def _check_priors(priors, ids: tuple[str, ...], height: int, width: int) -> tuple[np.ndarray | None, ...]:
    """Priors as a tuple of None / (H, W) bool arrays, one per prompt; anything else → :class:`PromptError`."""
    priors = tuple(priors)
    if len(priors) != len(ids):
        raise PromptError(f"{len(priors)} priors for {len(ids)} prompts")
    out: list[np.ndarray | None] = []
    for name, prior in zip(ids, priors):
        if prior is not None:
            prior = np.asarray(prior).astype(bool, copy=False)
            if prior.shape != (height, width):
                raise PromptError(f"prompt {name}: prior is {prior.shape}, the image is {(height, width)}")
        out.append(prior)
    return tuple(out)


def _span(lo: float, hi: float, size: int) -> slice:
    """Pixels whose centres fall in [lo, hi], at least one, clipped to [0, size)."""
    start = int(math.floor(lo + 0.5))
    stop = max(int(math.ceil(hi - 0.5)), start + 1)
    start, stop = max(start, 0), min(stop, size)
    return slice(start, max(stop, start + 1) if start < size else size)


def pixel_prompts(
    height: int,
    width: int,
    boxes: Sequence[Sequence[float]] | np.ndarray = (),
    points: Sequence[Sequence[float]] | np.ndarray = (),
    ids: Sequence[str] | None = None,
    priors: Sequence[np.ndarray | None] | None = None,
) -> PixelPrompts:
    """Box and point prompts in pixel coordinates; boxes first, then points (``ids`` and ``priors`` in that order).

    ``priors``: optional (H, W) bool shape priors, None per prompt without one (see :class:`PixelPrompts`). A box with zero or negative width/height, a box or point wholly outside the image, or a non-finite value →
    :class:`PromptError` naming the prompt. Boxes partly outside are clipped to the image.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    n = len(boxes) + len(points)
    ids = tuple(ids) if ids is not None else tuple(f"prompt{i}" for i in range(n))
    if len(ids) != n:
        raise PromptError(f"{len(ids)} prompt ids for {n} prompts")
    clipped = np.zeros(n, bool)
    out_boxes = np.full((n, 4), np.nan)
    out_points = np.full((n, 2), np.nan)
    for i, box in enumerate(boxes):
        out_boxes[i], clipped[i] = _clip_box(box, height, width, ids[i])
    for j, point in enumerate(points):
        i = len(boxes) + j
        if not np.isfinite(point).all():
            raise PromptError(f"prompt {ids[i]}: point {point.tolist()} is not finite")
        x, y = point
        if not (0 <= x <= width and 0 <= y <= height):
            raise PromptError(f"prompt {ids[i]}: point ({x:g}, {y:g}) is outside the {width}x{height} image")
        out_points[i] = (min(x, width - 0.5), min(y, height - 0.5))
    return PixelPrompts(out_boxes, out_points, ids, height, width, clipped,
                        None if priors is None else _check_priors(priors, ids, height, width))


def _clip_box(box: np.ndarray, height: int, width: int, name: str) -> tuple[np.ndarray, bool]:
    if not np.isfinite(box).all():
        raise PromptError(f"prompt {name}: box {box.tolist()} is not finite")
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        raise PromptError(f"prompt {name}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) has zero area "
                          "(need xmin < xmax and ymin < ymax)")
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise PromptError(f"prompt {name}: box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the "
                          f"{width}x{height} image")
    clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))])
    return clipped, bool((clipped != box).any())


def georeferenced_prompts(chip: Chip, geometries: Sequence, ids: Sequence[str] | None = None) -> PixelPrompts:
    """Prompts from EPSG:4326 shapely geometries on ``chip``'s grid (``chip.transform`` / ``chip.crs``).

    Polygons / lines → the pixel bounding box of their vertices; points → point prompts. Wholly outside the chip
    → :class:`PromptError`; partly outside → clipped (``clipped`` flag set). Empty geometries are errors too.
    """
    import shapely

    if chip.crs == geo.PIXEL_GRID_CRS:
        raise PromptError(f"{chip.source}: image has no georeference; georeferenced prompts cannot be placed on it")
    geometries = list(geometries)
    ids = tuple(ids) if ids is not None else tuple(f"prompt{i}" for i in range(len(geometries)))
    boxes, box_ids, points, point_ids = [], [], [], []
    for name, geom in zip(ids, geometries):
        if geom is None or shapely.is_empty(geom):
            raise PromptError(f"prompt {name}: empty geometry")
        coords = shapely.get_coordinates(geom)
        col, row = geo.lonlat_to_pixel(chip.transform, chip.crs, coords[:, 0], coords[:, 1])
        if shapely.get_type_id(geom) in (0, 4) and len(coords) == 1:  # Point / single-point MultiPoint
            points.append((float(col[0]), float(row[0])))
            point_ids.append(name)
        else:
            boxes.append((float(col.min()), float(row.min()), float(col.max()), float(row.max())))
            box_ids.append(name)
    return pixel_prompts(chip.height, chip.width, boxes, points, box_ids + point_ids)


def prompts_to_lonlat(chip: Chip, prompts: PixelPrompts) -> list:
    """EPSG:4326 shapely geometries of pixel prompts (boxes → polygons, points → points): the inverse mapping."""
    import shapely

    out = []
    for i in range(len(prompts)):
        if prompts.is_box[i]:
            x0, y0, x1, y1 = prompts.boxes[i]
            cols, rows = np.array([x0, x1, x1, x0]), np.array([y0, y0, y1, y1])
            lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, cols, rows)
            out.append(shapely.Polygon(np.c_[lon, lat]))
        else:
            lon, lat = geo.pixel_to_lonlat(chip.transform, chip.crs, prompts.points[i, 0], prompts.points[i, 1])
            out.append(shapely.Point(float(lon), float(lat)))
    return out


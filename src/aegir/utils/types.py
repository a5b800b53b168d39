"""Shared value types passed between dataflows."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from affine import Affine
from rasterio.crs import CRS


@dataclass(frozen=True)
class Chip:
    """An image chip on a georeferenced grid.

    ``pixels``: (C, H, W) array, band order given by ``bands``. ``transform``: rasterio Affine mapping (col, row)
    pixel corners to ``crs`` coordinates. ``gsd_m``: ground sample distance in metres. ``valid``: (H, W) bool,
    False where every band is nodata (None when all pixels are valid). ``georeferenced`` is False for chips whose
    grid was derived from a convention (named tiles) rather than read from the file; ``source`` names the file or
    URL, ``acquired_at`` an ISO timestamp when known, ``sensor`` e.g. "uav-rgb", "sentinel-2-l1c".
    """

    pixels: np.ndarray
    crs: CRS
    transform: Affine
    gsd_m: float
    bands: tuple[str, ...]
    source: str
    valid: np.ndarray | None = None
    sensor: str = "unknown"
    acquired_at: str | None = None
    georeferenced: bool = True
    extras: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 3:
            raise ValueError(f"{self.source}: chip pixels must be (C, H, W), got shape {self.pixels.shape}")
        if len(self.bands) != self.pixels.shape[0]:
            raise ValueError(f"{self.source}: {len(self.bands)} band names for {self.pixels.shape[0]} bands")
        if self.valid is not None and self.valid.shape != self.pixels.shape[1:]:
            raise ValueError(f"{self.source}: valid mask {self.valid.shape} does not match {self.pixels.shape[1:]}")

    @property
    def height(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[2])

    def rgb8(self) -> np.ndarray:
        """(3, H, W) uint8 RGB: grey repeated, bands beyond the third dropped, other dtypes stretched from the
        2nd–98th percentile of the valid pixels to 0–255."""
        pixels = self.pixels
        if pixels.shape[0] == 1:
            pixels = np.repeat(pixels, 3, axis=0)
        pixels = pixels[:3]
        if pixels.dtype != np.uint8:
            data = pixels.astype(np.float64)
            valid = np.ones(data.shape[1:], bool) if self.valid is None else self.valid
            lo, hi = np.percentile(data[:, valid], [2, 98]) if valid.any() else (0.0, 1.0)
            pixels = np.clip((data - lo) / max(hi - lo, 1e-9) * 255.0, 0, 255).astype(np.uint8)
        if pixels.shape[0] != 3:
            raise ValueError(f"{self.source}: {pixels.shape[0]} bands, an RGB view needs 1 or at least 3")
        return pixels

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` units."""
        left, top = self.transform @ (0, 0)
        right, bottom = self.transform @ (self.width, self.height)
        return (min(left, right), min(bottom, top), max(left, right), max(bottom, top))

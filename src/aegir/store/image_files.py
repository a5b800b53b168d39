"""Folders of image tiles and masks: listing, matching masks by file stem, reading masks.

A mask is a single-band raster on the image's pixel grid; PV where value > 0 (Jiang PV01 masks use 211/213).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files (BMP, PNG, JPEG, GeoTIFF) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def resolve_image_entries(entries: list[str], what: str = "images") -> list[Path]:
    """Image files named by ``entries``: files, folders (their images, sorted) or glob patterns; an entry that
    names nothing is a FileNotFoundError naming ``what`` and the entry."""
    import glob

    paths: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            paths += list_image_files(path)
        elif path.is_file():
            paths.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(entry) if Path(m).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"{what} {entry!r}: no such image file, folder or matching pattern")
            paths += matches
    return paths


def mask_files_by_stem(folder: str | Path | None) -> dict[str, Path]:
    """File stem → mask path for every image-like file in ``folder`` (empty when folder is None)."""
    if folder is None:
        return {}
    return {path.stem: path for path in list_image_files(folder)}


def read_mask(path: str | Path) -> np.ndarray:
    """(H, W) uint8 0/1 mask (PV where the file's first band > 0)."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import rasterio

            with rasterio.open(path) as dataset:
                band = dataset.read(1)
        else:
            with Image.open(path) as image:
                band = np.asarray(image)
    except Exception as exc:  # PIL.UnidentifiedImageError, rasterio errors, truncated files
        raise ValueError(f"{path}: cannot read mask ({type(exc).__name__}: {exc})") from exc
    if band.ndim == 3:
        band = band[..., 0]
    return (band > 0).astype(np.uint8)

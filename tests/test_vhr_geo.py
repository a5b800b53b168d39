"""Georeferencing helpers on the real named tiles: name parsing, derived grids, round trips, Austin overlaps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rasterio.crs import CRS

from aegir.store.rasters import named_tile_chip
from aegir.utils import geo

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
JIANG = SHARED / "vhr" / "jiang_pv01" / "images"
AUSTIN = SHARED / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"


def test_parse_tile_name_recognises_both_conventions() -> None:
    jiang = geo.parse_tile_name(JIANG / "PV01_324942_1203839.bmp")
    assert (jiang.convention, jiang.prefix) == ("jiang_pv01", "PV01")
    assert jiang.lat == pytest.approx(32.4942) and jiang.lon == pytest.approx(120.3839)
    austin = geo.parse_tile_name(AUSTIN / "30.298507_-97.69751.png")
    assert austin.convention == "google_static_z19"
    assert (austin.lat, austin.lon) == (30.298507, -97.69751)


@pytest.mark.parametrize("name", ["1698.png", "PV01_324942.bmp", "tile_a_b.png", "95.0_10.0.png"])
def test_parse_tile_name_rejects_other_names(name: str) -> None:
    with pytest.raises(ValueError, match=name.split(".")[0]):
        geo.parse_tile_name(f"/some/dir/{name}")


def test_jiang_grid_is_local_utm_centred_on_the_name() -> None:
    tile = geo.parse_tile_name(JIANG / "PV01_324942_1203839.bmp")
    grid = geo.named_tile_grid(tile)
    assert grid.crs == CRS.from_epsg(32651)  # 120.38 E → UTM zone 51 north
    assert (grid.width, grid.height, grid.gsd_m) == (256, 256, 0.1)
    assert (grid.transform.a, grid.transform.e, grid.transform.b, grid.transform.d) == (0.1, -0.1, 0.0, 0.0)
    lon, lat = geo.pixel_to_lonlat(grid.transform, grid.crs, 128.0, 128.0)
    assert float(lon) == pytest.approx(120.3839, abs=1e-9) and float(lat) == pytest.approx(32.4942, abs=1e-9)
    assert grid.position_uncertainty_m == pytest.approx(11.13, abs=0.01)


def test_austin_grid_is_web_mercator_zoom_19() -> None:
    tile = geo.parse_tile_name(AUSTIN / "30.298507_-97.69751.png")
    grid = geo.named_tile_grid(tile)
    assert grid.crs == CRS.from_epsg(3857) and (grid.width, grid.height) == (640, 640)
    assert grid.transform.a == pytest.approx(156543.03392804097 / 2**19)
    assert grid.gsd_m == pytest.approx(grid.transform.a * math.cos(math.radians(30.298507)))
    assert 0.25 < grid.gsd_m < 0.27
    lon, lat = geo.pixel_to_lonlat(grid.transform, grid.crs, 320.0, 320.0)
    assert float(lon) == pytest.approx(-97.69751, abs=1e-9) and float(lat) == pytest.approx(30.298507, abs=1e-9)


def test_pixel_lonlat_round_trip_is_sub_pixel() -> None:
    grid = geo.named_tile_grid(geo.parse_tile_name(JIANG / "PV01_324942_1203839.bmp"))
    cols, rows = np.array([0.5, 17.5, 255.5]), np.array([3.5, 128.5, 250.5])
    lon, lat = geo.pixel_to_lonlat(grid.transform, grid.crs, cols, rows)
    back_col, back_row = geo.lonlat_to_pixel(grid.transform, grid.crs, lon, lat)
    assert np.abs(back_col - cols).max() < 1e-6 and np.abs(back_row - rows).max() < 1e-6


def test_utm_zone_edges() -> None:
    assert geo.utm_crs(-180.0, 10.0) == CRS.from_epsg(32601)
    assert geo.utm_crs(179.99, -10.0) == CRS.from_epsg(32760)
    assert geo.utm_crs(3.0, 0.0) == CRS.from_epsg(32631)


def _gray(chip) -> np.ndarray:
    return chip.pixels.astype(np.float64).mean(axis=0)


def _overlap_offset(a_path: Path, b_path: Path, search: int = 4) -> tuple[float, float, float, float, float]:
    """Predicted (from the derived grids) and measured position of tile B's origin in tile A's pixels.

    The measurement maximises the normalised cross-correlation of the overlap strip over integer shifts
    around the prediction, then refines it to sub-pixel with a parabola through the peak and its neighbours.
    Returns (pred_col, pred_row, offset_col, offset_row, peak_ncc); offset = measured - predicted.
    """
    a, b = named_tile_chip(str(a_path)), named_tile_chip(str(b_path))
    assert a.crs == b.crs == geo.WEB_MERCATOR
    pred_col, pred_row = ~a.transform @ (b.transform @ (0, 0))
    ga, gb = _gray(a), _gray(b)
    height, width = ga.shape
    scores = {}
    for d_row in range(-search, search + 1):
        for d_col in range(-search, search + 1):
            col, row = round(pred_col) + d_col, round(pred_row) + d_row
            r0, r1, c0, c1 = max(0, row), min(height, height + row), max(0, col), min(width, width + col)
            pa, pb = ga[r0:r1, c0:c1], gb[r0 - row:r1 - row, c0 - col:c1 - col]
            pa, pb = pa - pa.mean(), pb - pb.mean()
            scores[(d_row, d_col)] = float((pa * pb).sum() / math.sqrt((pa * pa).sum() * (pb * pb).sum()))
    (best_row, best_col), peak = max(scores.items(), key=lambda kv: kv[1])

    def refine(minus: float, centre: float, plus: float) -> float:
        denominator = minus - 2 * centre + plus
        return 0.0 if denominator == 0 else 0.5 * (minus - plus) / denominator

    sub_col = refine(scores.get((best_row, best_col - 1), peak), peak, scores.get((best_row, best_col + 1), peak))
    sub_row = refine(scores.get((best_row - 1, best_col), peak), peak, scores.get((best_row + 1, best_col), peak))
    measured_col, measured_row = round(pred_col) + best_col + sub_col, round(pred_row) + best_row + sub_row
    return pred_col, pred_row, measured_col - pred_col, measured_row - pred_row, peak


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("30.298507_-97.70031.png", "30.298507_-97.69891.png"),  # east neighbour: ~522 px right
        ("30.301307_-97.70451.png", "30.302707_-97.70451.png"),  # north neighbour: ~605 px up
    ],
)
def test_austin_neighbours_footprints_match_image_overlap(a: str, b: str) -> None:
    """Adjacent Austin tiles: the overlap the Web Mercator grids predict is where the image content matches.

    Measured (sub-pixel): east neighbours +0.04..0.05 px along / 0.00 px across (peak NCC 0.97), north
    neighbours -0.43..+0.62 px along / 0.00 px across (peak NCC 0.86-0.88): the grids agree within a pixel.
    """
    pred_col, pred_row, off_col, off_row, peak = _overlap_offset(AUSTIN / a, AUSTIN / b)
    along, across = sorted((abs(pred_col), abs(pred_row)), reverse=True)
    assert 500 < along < 640 and across < 1  # neighbours (522 / 605 px apart) whose 640 px tiles partly overlap
    assert peak > 0.8
    assert abs(off_col) <= 1.0 and abs(off_row) <= 1.0


def test_reproject_chip_keeps_the_footprint_and_marks_outside_invalid() -> None:
    chip = named_tile_chip(str(JIANG / "PV01_324942_1203839.bmp"))
    half = geo.reproject_chip(chip, chip.crs, 0.2, "average")
    assert half.pixels.shape == (3, 128, 128) and half.valid is None
    assert half.bounds == pytest.approx(chip.bounds)
    block_mean = chip.pixels.reshape(3, 128, 2, 128, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(half.pixels.astype(np.float64) - block_mean).max() <= 1.0
    lonlat = geo.reproject_chip(chip, "EPSG:4326", 0.1, "nearest")
    assert lonlat.crs == CRS.from_epsg(4326) and lonlat.valid is not None and lonlat.valid.mean() > 0.9
    assert lonlat.gsd_m == pytest.approx(0.1, rel=0.05) and lonlat.georeferenced is False
    # a pixel of the warped chip shows the source pixel at the same lon/lat
    col, row = lonlat.width // 2, lonlat.height // 2
    lon, lat = geo.pixel_to_lonlat(lonlat.transform, lonlat.crs, col + 0.5, row + 0.5)
    src_col, src_row = geo.lonlat_to_pixel(chip.transform, chip.crs, lon, lat)
    assert np.array_equal(lonlat.pixels[:, row, col], chip.pixels[:, int(src_row), int(src_col)])

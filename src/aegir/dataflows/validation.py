"""Hamilton dataflow: accept / reject / needs-review decisions for PV detections, with reasons.

Inputs: ``detection_geometries`` (shapely polygons, EPSG:4326), ``detection_scores`` (model probability, (N,)),
``msi_chip`` (a Sentinel-2 :class:`~aegir.utils.types.Chip` in reflectance covering the detections; bands named
``B02``…, ``extras["scl"]`` (H, W) when an L2A SCL layer exists), ``cloud_shadow_mask`` ((H, W) uint8 0 clear /
1 cloud / 2 shadow on the MSI grid, from :func:`cloud_shadow_mask_from_csmask` when there is no SCL; None
otherwise) and ``validation_thresholds`` (:class:`ValidationThresholds`).

Evidence per detection: mean NDVI, NDBI, MNDWI and the PV indices NDPVI/NBD over the MSI pixels it covers (its
centre pixel when smaller than one), the share of those pixels that SCL or the cloud/shadow model marks
unusable, and its shape (geodesic area m², rectangularity = area / minimum rotated rectangle area).

Memory is O(scene), not O(detections × scene): all detections that overlap no other are rasterised once into an
(H, W) int32 label raster (``detection_label_raster``); the few that intersect another one (or are invalid polygons) are
rasterised one by one on their own window, so a pixel shared by two detections counts for both, as it would
alone; a detection no pixel centre falls in gets its centre pixel. The result, (detection, pixel) pairs
(``detection_pixels``), is reduced with ``np.bincount`` into every per-detection statistic; the spectral indices
are computed on the covered pixels only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine
from pyproj import Geod
from rasterio.features import rasterize
from rasterio.warp import transform_geom

from aegir.dataflows import spectral_indices
from aegir.utils.types import Chip

SCL_UNUSABLE = (0, 1, 3, 8, 9, 10, 11)  # no data, saturated, cloud shadow, cloud medium/high, cirrus, snow
SCL_WATER = 6
_GEOD = Geod(ellps="WGS84")
INDEX_NAMES = ("ndvi", "ndbi", "mndwi", "ndpvi", "nbd")


@dataclass(frozen=True)
class ValidationThresholds:
    """Decision thresholds (configurable). Indices are unitless; areas in m²."""

    max_ndvi: float = 0.45  # PV arrays are not dense vegetation
    max_mndwi: float = 0.2  # nor open water (floating PV aside: review)
    max_unusable_fraction: float = 0.5  # more cloud/shadow/snow than this → review, not reject
    min_area_m2: float = 2.0  # smaller than a single residential panel
    max_area_m2: float = 5e7
    min_rectangularity: float = 0.35
    min_score: float = 0.5
    require_msi: bool = True  # no valid MSI pixel → needs_review; False: decide on score and shape alone


@dataclass(frozen=True)
class DetectionPixels:
    """Which MSI pixels each of ``n`` detections covers, as (detection, pixel) pairs: memory O(covered pixels).

    ``detection``: (M,) int32 detection index; ``pixel``: (M,) int64 flat index ``row * W + col`` on the
    (H, W) = ``shape`` MSI grid. A pixel belongs to a detection when its centre lies in it (its centre pixel when
    no centre does); a pixel shared by overlapping detections appears once per detection.
    """

    detection: np.ndarray
    pixel: np.ndarray
    n: int
    shape: tuple[int, int]

    def counts(self) -> np.ndarray:
        """(N,) int64: number of MSI pixels per detection."""
        return np.bincount(self.detection, minlength=self.n)

    def pick(self, values: np.ndarray, what: str = "raster") -> np.ndarray:
        """(..., M) the values of a (..., H, W) raster (named ``what`` in errors) at each pair's pixel."""
        if values.shape[-2:] != self.shape:
            raise ValueError(f"{what} of shape {values.shape}, the MSI grid is {self.shape}")
        return values.reshape(*values.shape[:-2], -1)[..., self.pixel]

    def sums(self, picked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N,) float64 sum of the finite ``picked`` values ((M,), from :meth:`pick`) per detection, and (N,)
        int64 how many there were."""
        finite = np.isfinite(picked)
        detection = self.detection[finite]
        return (np.bincount(detection, weights=picked[finite], minlength=self.n),
                np.bincount(detection, minlength=self.n))

    def mask(self, i: int) -> np.ndarray:
        """(H, W) bool pixels of detection ``i`` (for inspection; allocates one scene-sized mask)."""
        out = np.zeros(self.shape[0] * self.shape[1], bool)
        out[self.pixel[self.detection == i]] = True
        return out.reshape(self.shape)


def detection_shapes(detection_geometries: list, msi_chip: Chip) -> list[dict]:
    """The detections as GeoJSON-like dicts in the MSI chip's CRS (input: shapely geometries, EPSG:4326)."""
    bad = [i for i, g in enumerate(detection_geometries) if not isinstance(g, shapely.Geometry) or g.is_empty]
    if bad:
        raise ValueError(f"detection_geometries {bad[:10]} are empty or not shapely geometries")
    if not detection_geometries:
        return []
    return list(transform_geom("EPSG:4326", msi_chip.crs, [shapely.geometry.mapping(g) for g in detection_geometries]))


def detection_overlaps(detection_shapes: list[dict]) -> np.ndarray:
    """(N,) bool: the detection intersects (or touches) another one, or is an invalid polygon.

    Those may share pixels with another detection, so they stay out of the label raster: two detections that do
    not intersect cannot both contain the same pixel centre.
    """
    geometries = np.asarray([shapely.geometry.shape(s) for s in detection_shapes], dtype=object)
    overlaps = ~shapely.is_valid(geometries) if len(geometries) else np.zeros(0, bool)
    valid = np.flatnonzero(~overlaps)
    a, b = shapely.STRtree(geometries[valid]).query(geometries[valid], predicate="intersects")
    overlaps[valid[a[a != b]]] = True
    return overlaps


def detection_label_raster(detection_shapes: list[dict], detection_overlaps: np.ndarray, msi_chip: Chip) -> np.ndarray:
    """(H, W) int32 label raster: i + 1 where the centre of the pixel lies in detection i, 0 elsewhere.

    One rasterisation of all detections that overlap no other (``detection_overlaps`` False), so every pixel has
    at most one of them; overlapping ones are left to :func:`detection_pixels`.
    """
    shapes = [(s, i + 1) for i, s in enumerate(detection_shapes) if not detection_overlaps[i]]
    out_shape = (msi_chip.height, msi_chip.width)
    if not shapes:
        return np.zeros(out_shape, np.int32)
    return rasterize(shapes, out_shape=out_shape, transform=msi_chip.transform, fill=0, dtype="int32")


def _window_pixels(shape: dict, chip: Chip) -> np.ndarray:
    """(K,) int64 flat indices of the chip pixels whose centre lies in ``shape`` (chip CRS), rasterised on the
    window of the chip covering its bounding box (1 pixel margin)."""
    left, bottom, right, top = shapely.bounds(shapely.geometry.shape(shape))
    cols, rows = ~chip.transform @ (np.array([left, right, left, right]), np.array([bottom, bottom, top, top]))
    c0, c1 = np.clip([np.floor(cols.min()) - 1, np.ceil(cols.max()) + 1], 0, chip.width).astype(int)
    r0, r1 = np.clip([np.floor(rows.min()) - 1, np.ceil(rows.max()) + 1], 0, chip.height).astype(int)
    if c1 <= c0 or r1 <= r0:
        return np.zeros(0, np.int64)
    window = chip.transform @ Affine.translation(c0, r0)
    inside = rasterize([(shape, 1)], out_shape=(r1 - r0, c1 - c0), transform=window, fill=0, dtype="uint8")
    rows_in, cols_in = np.nonzero(inside)
    return (rows_in + r0).astype(np.int64) * chip.width + (cols_in + c0)


def _centre_pixel(shape: dict, chip: Chip) -> int | None:
    """Flat index of the chip pixel holding the detection's centroid; None when it lies outside the chip."""
    centre = shapely.centroid(shapely.geometry.shape(shape))
    col, row = ~chip.transform @ (centre.x, centre.y)
    if 0 <= row < chip.height and 0 <= col < chip.width:
        return int(row) * chip.width + int(col)
    return None


def detection_pixels(
    detection_label_raster: np.ndarray, detection_shapes: list[dict], detection_overlaps: np.ndarray, msi_chip: Chip
) -> DetectionPixels:
    """The MSI pixels of every detection: the label raster's, plus each overlapping detection rasterised alone on
    its own window, plus the centre pixel of each detection no pixel centre falls in (all none when outside the
    chip). Memory: O(H·W) for the raster and the pairs, plus the pixels of overlapping detections."""
    pixel = np.flatnonzero(detection_label_raster)
    pieces = [(detection_label_raster.reshape(-1)[pixel] - 1, pixel)]
    for i in np.flatnonzero(detection_overlaps):
        own = _window_pixels(detection_shapes[i], msi_chip)
        pieces.append((np.full(len(own), i, np.int32), own))
    n = len(detection_shapes)
    covered = np.zeros(n, bool)
    for detection, _ in pieces:
        covered[detection] = True
    centres = [(i, _centre_pixel(detection_shapes[i], msi_chip)) for i in np.flatnonzero(~covered)]
    centres = [(i, p) for i, p in centres if p is not None]
    pieces.append((np.array([i for i, _ in centres], np.int32), np.array([p for _, p in centres], np.int64)))
    return DetectionPixels(np.concatenate([d for d, _ in pieces]).astype(np.int32, copy=False),
                           np.concatenate([p for _, p in pieces]).astype(np.int64, copy=False), n,
                           (msi_chip.height, msi_chip.width))


def detection_pixel_count(detection_pixels: DetectionPixels) -> np.ndarray:
    """(N,) int64 number of MSI pixels per detection (0 when outside the chip)."""
    return detection_pixels.counts()


def msi_indices(msi_chip: Chip) -> dict[str, np.ndarray]:
    """NDVI, NDBI, MNDWI, NDPVI, NBD of the whole MSI chip, each (H, W) float32 (NaN on nodata). For display:
    the evidence computes them on the detections' pixels only."""
    return spectral_indices.indices_for_chip(msi_chip, INDEX_NAMES)


def _mean(detection_pixels: DetectionPixels, picked: np.ndarray) -> np.ndarray:
    """(N,) float64 mean of the finite ``picked`` values ((M,)) per detection; NaN where there is none."""
    sums, counts = detection_pixels.sums(picked)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def index_evidence(detection_pixels: DetectionPixels, msi_chip: Chip) -> dict[str, np.ndarray]:
    """Mean of NDVI, NDBI, MNDWI, NDPVI, NBD over each detection's pixels, NaN ignored (NaN when no valid
    pixel). Each (N,) float64. The indices are per pixel, so they are computed on the (M,) covered pixels only
    (a (C, 1, M) pixel-list chip), not on the scene."""
    valid = None if msi_chip.valid is None else detection_pixels.pick(msi_chip.valid)[None]
    covered = replace(msi_chip, pixels=detection_pixels.pick(msi_chip.pixels)[:, None, :], valid=valid)
    indices = spectral_indices.indices_for_chip(covered, INDEX_NAMES)
    return {name: _mean(detection_pixels, values[0]) for name, values in indices.items()}


def unusable_fraction(
    detection_pixels: DetectionPixels, msi_chip: Chip, cloud_shadow_mask: np.ndarray | None = None
) -> np.ndarray:
    """Share of each detection's pixels that SCL (or else the cloud/shadow model) marks unusable. (N,) float64:
    NaN without pixels; 0 everywhere when neither SCL nor a cloud/shadow mask is given."""
    scl = msi_chip.extras.get("scl")
    if scl is not None:
        unusable = np.isin(detection_pixels.pick(np.asarray(scl), "SCL"), SCL_UNUSABLE)
    elif cloud_shadow_mask is not None:
        unusable = detection_pixels.pick(np.asarray(cloud_shadow_mask), "cloud_shadow_mask") > 0
    else:
        return np.zeros(detection_pixels.n)
    return _mean(detection_pixels, unusable)


def shape_evidence(detection_geometries: list) -> dict[str, np.ndarray]:
    """Geodesic ``area_m2`` and ``rectangularity`` (area / minimum rotated rectangle area) per detection."""
    geometries = shapely.orient_polygons(np.asarray(detection_geometries, dtype=object))
    area = np.array([abs(_GEOD.geometry_area_perimeter(g)[0]) for g in geometries])
    rect = shapely.area(geometries) / np.maximum(shapely.area(shapely.minimum_rotated_rectangle(geometries)), 1e-30)
    return {"area_m2": area, "rectangularity": rect}


def _reasons(i: int, score: float, idx: dict, unusable: float, shape: dict, t: ValidationThresholds) -> tuple[str, list[str]]:
    rejects, reviews = [], []
    if score < t.min_score:
        rejects.append(f"score {score:.2f} < {t.min_score}")
    if shape["area_m2"][i] < t.min_area_m2 or shape["area_m2"][i] > t.max_area_m2:
        rejects.append(f"area {shape['area_m2'][i]:.1f} m² outside [{t.min_area_m2}, {t.max_area_m2:g}]")
    if shape["rectangularity"][i] < t.min_rectangularity:
        reviews.append(f"irregular shape (rectangularity {shape['rectangularity'][i]:.2f})")
    if np.isfinite(unusable) and unusable > t.max_unusable_fraction:
        reviews.append(f"{unusable:.0%} of its pixels are cloud/shadow/snow")
    elif np.isnan(idx["ndvi"][i]):
        if t.require_msi:
            reviews.append("no valid multispectral pixel")
    else:
        if idx["ndvi"][i] > t.max_ndvi:
            rejects.append(f"vegetation: NDVI {idx['ndvi'][i]:.2f} > {t.max_ndvi}")
        if idx["mndwi"][i] > t.max_mndwi:
            rejects.append(f"water: MNDWI {idx['mndwi'][i]:.2f} > {t.max_mndwi}")
    decision = "reject" if rejects else "needs_review" if reviews else "accept"
    return decision, rejects + reviews


def validation_decisions(
    detection_scores: np.ndarray,
    index_evidence: dict[str, np.ndarray],
    unusable_fraction: np.ndarray,
    shape_evidence: dict[str, np.ndarray],
    validation_thresholds: ValidationThresholds,
) -> pa.Table:
    """One row per detection: decision (accept | reject | needs_review), reasons, and all the evidence."""
    lengths = {"unusable_fraction": len(unusable_fraction)} | {k: len(v) for k, v in index_evidence.items()}
    wrong = {k: n for k, n in (lengths | {k: len(v) for k, v in shape_evidence.items()}).items()
             if n != len(detection_scores)}
    if wrong:
        raise ValueError(f"{len(detection_scores)} detection scores but evidence of other lengths: {wrong}")
    decisions, reasons = [], []
    for i, score in enumerate(np.asarray(detection_scores, dtype=float)):
        decision, why = _reasons(i, score, index_evidence, unusable_fraction[i], shape_evidence, validation_thresholds)
        decisions.append(decision)
        reasons.append(why)
    columns = {"decision": pa.array(decisions), "reasons": pa.array(reasons, pa.list_(pa.string())),
               "score": pa.array(np.asarray(detection_scores, dtype=float)),
               "unusable_fraction": pa.array(unusable_fraction)}
    columns |= {name: pa.array(values) for name, values in index_evidence.items()}
    columns |= {name: pa.array(values) for name, values in shape_evidence.items()}
    table = pa.table(columns)
    return table.replace_schema_metadata({"thresholds": str(asdict(validation_thresholds))})


def object_level_scores(
    detection_geometries: list, reference_geometries: list, match_iou: float = 0.5
) -> dict[str, float | int]:
    """Detections vs held reference labels (both polygons in one CRS, e.g. EPSG:4326).

    Object level: greedy one-to-one matching by descending IoU, a match needs IoU ≥ ``match_iou``;
    ``precision`` = matched / detections, ``recall`` = matched / references, ``f1``. Area level: ``area_iou`` =
    area(∩ of the two unions) / area(∪ of the two unions) — the pixel IoU at infinite resolution (area ratios in
    degrees are exact enough for objects of a few hundred metres).
    """
    detections = np.asarray([g for g in detection_geometries if g is not None and not g.is_empty], dtype=object)
    references = np.asarray([g for g in reference_geometries if g is not None and not g.is_empty], dtype=object)
    pairs = []
    if len(detections) and len(references):
        det_idx, ref_idx = shapely.STRtree(references).query(detections)  # bounding boxes meet
        inter = shapely.area(shapely.intersection(detections[det_idx], references[ref_idx]))
        union = shapely.area(detections[det_idx]) + shapely.area(references[ref_idx]) - inter
        ious = np.where(union > 0, inter / np.maximum(union, 1e-30), 0.0)
        pairs = sorted(zip(ious, det_idx, ref_idx), reverse=True)
    used_det, used_ref, matched = set(), set(), 0
    for iou, d, r in pairs:
        if iou < match_iou:
            break
        if d not in used_det and r not in used_ref:
            used_det.add(d)
            used_ref.add(r)
            matched += 1
    precision = matched / len(detections) if len(detections) else float(len(references) == 0)
    recall = matched / len(references) if len(references) else float(len(detections) == 0)
    det_union, ref_union = shapely.union_all(detections), shapely.union_all(references)
    union_area = shapely.area(shapely.union(det_union, ref_union))
    area_iou = float(shapely.area(shapely.intersection(det_union, ref_union)) / union_area) if union_area else 1.0
    return {"detections": int(len(detections)), "references": int(len(references)), "matched": matched,
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "area_iou": area_iou, "match_iou": match_iou}


def cloud_shadow_mask_from_csmask(msi_chip: Chip, product_level: str = "l1c") -> np.ndarray:
    """(H, W) uint8 0 clear / 1 cloud / 2 shadow from the pretrained ukis-csmask ONNX U-Net (6 bands, 10 m).

    Bands B02, B03, B04, B08, B11, B12 in reflectance (NaN → 0 = nodata). Not a Hamilton node input by default:
    call it when the MSI chip has no SCL layer, and pass the result as ``cloud_shadow_mask``.
    """
    from ukis_csmask.mask import CSmask

    order = ("B02", "B03", "B04", "B08", "B11", "B12")
    missing = [b for b in order if b not in msi_chip.bands]
    if missing:
        raise ValueError(f"{msi_chip.source}: cloud/shadow model needs bands {', '.join(missing)}")
    image = np.stack([msi_chip.pixels[msi_chip.bands.index(b)] for b in order], axis=-1)
    image = np.nan_to_num(image, nan=0.0).astype(np.float32)
    model = CSmask(img=image, band_order=["blue", "green", "red", "nir", "swir16", "swir22"],
                   product_level=product_level, nodata_value=0)
    return np.asarray(model.csm)[..., 0].astype(np.uint8)

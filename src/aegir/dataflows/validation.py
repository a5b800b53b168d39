"""Hamilton dataflow: accept / reject / needs-review decisions for PV detections, with reasons.

Inputs: ``detection_geometries`` (shapely polygons, EPSG:4326), ``detection_scores`` (model probability, (N,)),
``msi_chip`` (a Sentinel-2 :class:`~aegir.utils.types.Chip` in reflectance covering the detections; bands named
``B02``…, ``extras["scl"]`` (H, W) when an L2A SCL layer exists), ``cloud_shadow_mask`` ((H, W) uint8 0 clear /
1 cloud / 2 shadow on the MSI grid, from :func:`cloud_shadow_mask_from_csmask` when there is no SCL; None
otherwise) and ``validation_thresholds`` (:class:`ValidationThresholds`).

Evidence per detection: mean NDVI, NDBI, MNDWI and the PV indices NDPVI/NBD over the MSI pixels it covers (its
centre pixel when smaller than one), the share of those pixels that SCL or the cloud/shadow model marks
unusable, and its shape (geodesic area m², rectangularity = area / minimum rotated rectangle area).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import shapely
from pyproj import Geod
from rasterio.features import geometry_mask
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


def _pixels_of(geometry: shapely.Geometry, chip: Chip) -> np.ndarray:
    """(H, W) bool: MSI pixels whose centre lies in the detection; its centre pixel when none does."""
    shape = transform_geom("EPSG:4326", chip.crs, shapely.geometry.mapping(geometry))
    inside = ~geometry_mask([shape], out_shape=(chip.height, chip.width), transform=chip.transform)
    if not inside.any():
        centre = shapely.centroid(shapely.geometry.shape(shape))
        col, row = ~chip.transform @ (centre.x, centre.y)
        if 0 <= row < chip.height and 0 <= col < chip.width:
            inside[int(row), int(col)] = True
    return inside


def detection_pixels(detection_geometries: list, msi_chip: Chip) -> list[np.ndarray]:
    """Per detection, the (H, W) bool mask of the MSI pixels it covers (all False when outside the chip)."""
    return [_pixels_of(g, msi_chip) for g in detection_geometries]


def msi_indices(msi_chip: Chip) -> dict[str, np.ndarray]:
    """NDVI, NDBI, MNDWI, NDPVI, NBD of the MSI chip, each (H, W) float32 (NaN on nodata)."""
    return spectral_indices.indices_for_chip(msi_chip, INDEX_NAMES)


def index_evidence(detection_pixels: list[np.ndarray], msi_indices: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mean of each index over each detection's pixels (NaN when no valid pixel). Each (N,) float64."""
    out = {}
    for name, values in msi_indices.items():
        out[name] = np.array(
            [np.nanmean(values[p]) if p.any() and np.isfinite(values[p]).any() else np.nan for p in detection_pixels]
        )
    return out


def unusable_fraction(
    detection_pixels: list[np.ndarray], msi_chip: Chip, cloud_shadow_mask: np.ndarray | None = None
) -> np.ndarray:
    """Share of each detection's pixels that SCL (or else the cloud/shadow model) marks unusable. (N,) float64."""
    scl = msi_chip.extras.get("scl")
    if scl is not None:
        unusable = np.isin(scl, SCL_UNUSABLE)
    elif cloud_shadow_mask is not None:
        unusable = cloud_shadow_mask > 0
    else:
        return np.zeros(len(detection_pixels))
    return np.array([unusable[p].mean() if p.any() else np.nan for p in detection_pixels])


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

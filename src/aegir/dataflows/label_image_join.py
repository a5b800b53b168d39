"""Hamilton dataflow: lakehouse labels × catalogued images → prompts in each image's pixel grid.

Two passes around the store's spatial join (:func:`aegir.store.ducklake.label_image_pairs`):

1. ``label_cover_cells`` (from ``label_records``, Arrow rows of ``aegir.store.ducklake.LABEL_COLUMNS``): the
   cover-level S2 cells every label touches, from a grid of points over its bounding box (spacing ≤ a quarter of
   the smallest cell edge, plus the box corners and a one-spacing margin), so the equality pre-filter on cells
   cannot drop a label that meets an image.
2. ``image_prompts`` (also from ``label_image_pairs`` and ``catalog_images``, the catalog rows of the paired
   images): one prompt per (label, image) pair in that image's pixel grid (x = column, y = row, integers at pixel
   corners): a point label → a point prompt; a polygon → its pixel box, and ``prompt_kind`` ``box`` when the
   polygon fills ≥ :data:`BOX_FILL` of that box (a box label) else ``polygon`` with the polygon itself
   (``polygon_pixels_wkb``) kept as a prior. Labels partly outside the image are clipped to it and flagged.
   ``labels_without_imagery``: per label dataset, how many labels met no image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import shapely
from affine import Affine
from rasterio.crs import CRS

from aegir.dataflows.imagery_catalog import COVER_LEVEL
from aegir.dataflows.label_prompts import prompt_uuid
from aegir.utils import geo, s2geometry

BOX_FILL = 0.95  # a polygon filling this share of its pixel box is a box label
_MIN_EDGE_DEG = 0.009  # a level-12 cell's shortest edge is > 1 km ≈ 0.009° of latitude; spacing stays ≤ a quarter
_GRID_POINTS_MAX = 4096  # larger labels (farms of tens of km²) use the exact covering of their geometry


def label_shapes(label_records: pa.Table) -> np.ndarray:
    """(N,) shapely geometries of the labels, EPSG:4326."""
    return shapely.from_wkb(label_records["geometry_wkb"].to_numpy(zero_copy_only=False))


def label_cover_cells(label_shapes: np.ndarray) -> pa.Table:
    """(label_index, token): every level-:data:`COVER_LEVEL` cell each label's bounding box touches, from a grid of
    points per box (vectorised over the labels sharing a grid size); a label whose grid would exceed
    :data:`_GRID_POINTS_MAX` points uses the exact covering of its geometry instead."""
    bounds = shapely.bounds(label_shapes)
    step = _MIN_EDGE_DEG / 4
    known = ~np.isnan(bounds[:, 0])
    nx = np.where(known, np.ceil((bounds[:, 2] - bounds[:, 0]) / step), 0).astype(np.int64) + 3
    ny = np.where(known, np.ceil((bounds[:, 3] - bounds[:, 1]) / step), 0).astype(np.int64) + 3
    index_parts, cell_parts = [], []
    for index in np.flatnonzero(known & (nx * ny > _GRID_POINTS_MAX)):
        cells = s2geometry.token_to_cell_id(np.array(s2geometry.s2_covering(label_shapes[index], COVER_LEVEL)))
        index_parts.append(np.full(len(cells), index, np.int64))
        cell_parts.append(np.asarray(cells, dtype=np.uint64))
    small = known & (nx * ny <= _GRID_POINTS_MAX)
    for gx, gy in set(zip(nx[small].tolist(), ny[small].tolist())):
        members = np.flatnonzero(small & (nx == gx) & (ny == gy))
        x0, y0 = bounds[members, 0] - step, bounds[members, 1] - step
        width, height = bounds[members, 2] - bounds[members, 0] + 2 * step, bounds[members, 3] - bounds[members, 1] + 2 * step
        fx, fy = np.meshgrid(np.linspace(0, 1, gx), np.linspace(0, 1, gy))
        lon = x0[:, None] + width[:, None] * fx.ravel()[None, :]
        lat = np.clip(y0[:, None] + height[:, None] * fy.ravel()[None, :], -90.0, 90.0)
        cells = s2geometry.s2_cell_ids(lat.ravel(), ((lon.ravel() + 180.0) % 360.0) - 180.0, COVER_LEVEL)
        pairs = np.unique(np.column_stack([np.repeat(members, gx * gy), cells.astype(np.int64)]), axis=0)
        index_parts.append(pairs[:, 0])
        cell_parts.append(pairs[:, 1].astype(np.uint64))
    if not index_parts:
        return pa.table({"label_index": pa.array([], pa.int64()), "token": pa.array([], pa.string())})
    tokens = s2geometry.cell_id_to_token(np.concatenate(cell_parts))
    return pa.table({"label_index": pa.array(np.concatenate(index_parts), pa.int64()),
                     "token": pa.array(tokens.astype(str), pa.string())})


def label_geometry_table(label_records: pa.Table) -> pa.Table:
    """(label_index, geometry_wkb): the labels as the store's join reads them."""
    return pa.table({"label_index": pa.array(np.arange(label_records.num_rows), pa.int64()),
                     "geometry_wkb": label_records["geometry_wkb"]})


def _to_pixels(geometry: shapely.Geometry, transform: Affine, crs: CRS | str) -> shapely.Geometry:
    def convert(xy: np.ndarray) -> np.ndarray:
        col, row = geo.lonlat_to_pixel(transform, crs, xy[:, 0], xy[:, 1])
        return np.column_stack([col, row])

    return shapely.transform(geometry, convert)


def _prompt_of(geometry: shapely.Geometry, width: int, height: int) -> dict:
    """kind, box, point, clipped and the pixel polygon of one pixel-grid geometry on a width × height image."""
    frame = shapely.box(0, 0, width, height)
    slack = shapely.box(-0.5, -0.5, width + 0.5, height + 0.5)  # reprojection noise is not clipping
    if shapely.get_type_id(geometry) == 0:
        x, y = geometry.x, geometry.y
        return {"prompt_kind": "point", "x": min(max(x, 0.0), width - 0.5), "y": min(max(y, 0.0), height - 0.5),
                "xmin": None, "ymin": None, "xmax": None, "ymax": None, "clipped": not slack.covers(geometry),
                "polygon_pixels_wkb": None}
    inside = shapely.intersection(shapely.make_valid(geometry), frame)
    x0, y0, x1, y1 = inside.bounds if not inside.is_empty else (np.nan,) * 4
    box_area = max((x1 - x0) * (y1 - y0), 1e-9)
    kind = "box" if shapely.area(geometry) >= BOX_FILL * max(shapely.area(shapely.envelope(geometry)), 1e-9) \
        else "polygon"
    return {"prompt_kind": kind, "x": None, "y": None, "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1,
            "clipped": not slack.covers(geometry) and box_area > 0,
            "polygon_pixels_wkb": shapely.to_wkb(inside) if kind == "polygon" and not inside.is_empty else None}


IMAGE_ASSIGNMENTS = ("best", "all")


def _hinted_pairs(label_records: pa.Table, label_image_pairs: pa.Table, catalog_images: pa.Table) -> pa.Table:
    """Pairs left after labels with an ``image_hint`` naming one of their candidate images keep only that one."""
    if "image_hint" not in label_records.column_names or label_image_pairs.num_rows == 0:
        return label_image_pairs
    stems = {row["image_id"]: (Path(row["uri"]).stem, Path(row["uri"]).name) for row in catalog_images.to_pylist()}
    hints = label_records["image_hint"].to_pylist()
    labels, ids = label_image_pairs["label_index"].to_pylist(), label_image_pairs["image_id"].to_pylist()
    matched = {label for label, image in zip(labels, ids) if hints[label] in stems[image]}
    keep = [i for i, (label, image) in enumerate(zip(labels, ids)) if label not in matched or hints[label] in stems[image]]
    return label_image_pairs.take(pa.array(keep, pa.int64()))


def assigned_pairs(label_records: pa.Table, label_image_pairs: pa.Table, catalog_images: pa.Table,
                   image_assignment: str = "all") -> pa.Table:
    """The (label, image) pairs kept. A label whose ``image_hint`` (its ``image`` attribute) names one of the
    images it meets stays on that image only: labels drawn on one image of overlapping imagery (e.g. Jiang tiles
    georeferenced by name, a few metres apart) are not pasted onto its neighbours. Other labels: ``all`` the
    images they meet, or the ``best`` one — the largest share of the label inside it, then the nearest centre."""
    if image_assignment not in IMAGE_ASSIGNMENTS:
        raise ValueError(f"image assignment {image_assignment!r} must be one of {', '.join(IMAGE_ASSIGNMENTS)}")
    label_image_pairs = _hinted_pairs(label_records, label_image_pairs, catalog_images)
    if image_assignment == "all" or label_image_pairs.num_rows == 0:
        return label_image_pairs
    labels = label_image_pairs["label_index"].to_pylist()
    shares, distances = label_image_pairs["share"].to_pylist(), label_image_pairs["centre_distance"].to_pylist()
    order = sorted(range(len(labels)), key=lambda i: (labels[i], -shares[i], distances[i]))
    seen, keep = set(), []
    for i in order:
        label = labels[i]
        if label not in seen:
            seen.add(label)
            keep.append(i)
    return label_image_pairs.take(pa.array(sorted(keep), pa.int64()))


def image_prompts(label_records: pa.Table, label_shapes: np.ndarray, assigned_pairs: pa.Table,
                  catalog_images: pa.Table) -> pa.Table:
    """One prompt per kept (label, image) pair in the image's pixel grid (see the module docstring)."""
    images = {row["image_id"]: row for row in catalog_images.to_pylist()}
    grids = {image_id: (Affine(*row["transform"]), CRS.from_user_input(row["crs"]).to_wkt())
             for image_id, row in images.items()}  # once per image, not per pair
    uuids = prompt_uuid(label_records).to_pylist()
    datasets = label_records["dataset_name"].to_pylist()
    hashes = label_records["row_hash"].to_pylist()
    rows = []
    for index, image_id, inside in zip(*(assigned_pairs[c].to_pylist() for c in
                                         ("label_index", "image_id", "inside"))):
        image = images[image_id]
        prompt = _prompt_of(_to_pixels(label_shapes[index], *grids[image_id]), image["width"], image["height"])
        if prompt["prompt_kind"] != "point" and np.isnan(prompt["xmin"]):
            continue  # touches the footprint only along an edge: nothing of it on the pixel grid
        rows.append({"uuid": uuids[index],
                     "dataset": datasets[index], "row_hash": hashes[index], "label_index": int(index),
                     "image_id": image_id, "image_uri": image["uri"], "inside": bool(inside), **prompt})
    return pa.Table.from_pylist(rows, schema=IMAGE_PROMPT_SCHEMA)


IMAGE_PROMPT_SCHEMA = pa.schema([
    ("uuid", pa.string()), ("dataset", pa.string()), ("row_hash", pa.string()), ("label_index", pa.int64()),
    ("image_id", pa.string()), ("image_uri", pa.string()), ("inside", pa.bool_()), ("prompt_kind", pa.string()),
    ("x", pa.float64()), ("y", pa.float64()), ("xmin", pa.float64()), ("ymin", pa.float64()),
    ("xmax", pa.float64()), ("ymax", pa.float64()), ("clipped", pa.bool_()), ("polygon_pixels_wkb", pa.binary()),
])


def labels_without_imagery(label_records: pa.Table, image_prompts: pa.Table) -> dict[str, int]:
    """{label dataset: labels that met no catalogued image} (datasets with none left out)."""
    met = set(image_prompts["label_index"].to_pylist())
    counts: dict[str, int] = {}
    for index, dataset in enumerate(label_records["dataset_name"].to_pylist()):
        if index not in met:
            counts[dataset] = counts.get(dataset, 0) + 1
    return counts

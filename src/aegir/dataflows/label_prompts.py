"""Hamilton dataflow: lakehouse labels → Mask Factory prompts (an Arrow table).

Input node: ``label_records`` (Arrow, columns ``aegir.store.ducklake.LABEL_COLUMNS``: the label rows matching a
query, read by the job through the store layer). Output ``prompts``: one row per label with a deterministic uuid,
the prompt geometry as WKB in EPSG:4326, its lon/lat bbox, centroid, S2 tokens, H3 cell, area and provenance back
to the source row.
"""

from __future__ import annotations

import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import shapely

PROMPT_NAMESPACE = uuid.UUID("8f7c2f64-4a55-4f0a-9d7e-6a1b2f0c9e11")


def prompt_uuid(label_records: pa.Table) -> pa.Array:
    """uuid5 of ``dataset_name:row_hash``: the same label always gives the same prompt uuid. Shape (N,)."""
    keys = zip(label_records["dataset_name"].to_pylist(), label_records["row_hash"].to_pylist())
    return pa.array([str(uuid.uuid5(PROMPT_NAMESPACE, f"{d}:{h}")) for d, h in keys], pa.string())


def prompt_geometry(label_records: pa.Table) -> np.ndarray:
    """Shapely geometries (EPSG:4326) of the labels. Shape (N,)."""
    return shapely.from_wkb(label_records["geometry_wkb"].to_numpy(zero_copy_only=False))


def prompt_bbox(prompt_geometry: np.ndarray) -> np.ndarray:
    """(min_lon, min_lat, max_lon, max_lat) per prompt in degrees. Shape (N, 4)."""
    return shapely.bounds(prompt_geometry).reshape(-1, 4)


def prompt_kind(prompt_geometry: np.ndarray) -> pa.Array:
    """"point" for point labels (USPVDB centroids), "polygon" otherwise. Shape (N,)."""
    types = shapely.get_type_id(prompt_geometry)
    return pa.array(np.where(types == 0, "point", "polygon").tolist(), pa.string())


def prompts(label_records: pa.Table, prompt_uuid: pa.Array, prompt_bbox: np.ndarray, prompt_kind: pa.Array) -> pa.Table:
    """Prompt table: uuid, dataset, prompt_geometry (WKB, EPSG:4326), prompt_kind, bbox_*, centroid, S2, H3, provenance."""
    columns = {
        "uuid": prompt_uuid,
        "dataset": label_records["dataset_name"],
        "prompt_geometry": label_records["geometry_wkb"],
        "prompt_kind": prompt_kind,
    }
    for index, name in enumerate(("bbox_min_lon", "bbox_min_lat", "bbox_max_lon", "bbox_max_lat")):
        columns[name] = pa.array(prompt_bbox[:, index], pa.float64())
    for name in ("centroid_lat", "centroid_lon", "area_m2", "s2_token_l10", "s2_token_l13", "s2_token_l17",
                 "h3_12", "label_date", "source_file", "source_row", "row_hash"):
        columns[name] = label_records[name]
    table = pa.table(columns)
    return table.filter(pc.invert(pc.is_null(table["prompt_geometry"])))

"""Hamilton dataflow: the two embedding hooks (issue #8) on a region's validated detections.

(a) **hard-negative mining** (``mined_negative_proposals``): each rejected detection (the model was sure, validation
said no) is cut as a ``crop_px``² chip centred on it, embedded with the round's encoder, and its ``mine_k`` nearest
tile windows of the region are proposed as negatives: windows that *look like* a confirmed false positive and touch
no accepted or needs-review detection, no known PV label and none of the query detections themselves (those are
the backfill's hard negatives already). Whatever the model detected inside a proposed window was rejected by
validation, so an all-background mask agrees with every judgement made there. A window proposed by several
detections keeps its nearest one (provenance: source detection, cosine distance, round); at most ``max_mined``
of them, nearest first.

(b) **find more like this** (``similar_tile_hits`` → ``cell_boosts``): each accepted detection's chip is embedded and
its ``similar_k`` nearest windows that hold neither an accepted / needs-review detection nor a known label are the
"similar unlabelled tiles"; each grid-plan cell (S2 token at the plan level) holding such windows gets a boost
Σ (1 − d/2) over its windows (d: cosine distance in [0, 2], each window counted once at its smallest d), which the
grid plan ranks ahead of every unboosted cell (:mod:`aegir.dataflows.grid_plan`).

Inputs: ``detections`` (GeoDataFrame, EPSG:4326, ``detection_id``, ``score``, geometry), ``validation_decisions``
(Arrow, ``decision`` aligned with ``detections``), ``detection_tiles`` ({detection_id: tile Chip}), ``crop_px``,
``encode_chips`` ((B, C, H, W) → (B, D)), ``label_geometries`` (known PV labels, EPSG:4326), ``region_windows``
(Arrow: ``uuid``, ``footprint_wkb`` of the region's stored windows for this model), ``max_hard_negatives`` /
``max_backfill`` (queries per hook, highest score first, as in the backfill), ``max_mined``, ``round_index``.

The vector search is the job's: it executes ``rejected_query_vectors`` / ``accepted_query_vectors`` and
``mining_excluded_windows`` / ``similar_excluded_windows``, searches the store for each query vector's ``mine_k`` /
``similar_k`` nearest windows outside the excluded ones, and passes them back as ``rejected_query_neighbours`` /
``accepted_query_neighbours`` (one list per query chip, same order, nearest first: ``{uuid, distance, tile_path,
window_col, window_row, window_px, footprint_wkb, cell_token, …}``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import shapely

from aegir.dataflows import backfill
from aegir.dataflows.chip_embeddings import chip_embedding_vectors
from aegir.utils.types import Chip

EncodeChips = Callable  # (B, C, H, W) uint8 -> (B, D); bare for Hamilton's isinstance check
Neighbours = list  # per query chip: its nearest windows (list of dicts), nearest first

HIT_SCHEMA = pa.schema([
    pa.field("window_uuid", pa.string()),
    pa.field("source_detection", pa.string()),
    pa.field("distance", pa.float64()),  # cosine distance, [0, 2]
    pa.field("neighbour_rank", pa.int32()),  # 0 = nearest window of its source detection
    pa.field("tile_path", pa.string()),
    pa.field("window_col", pa.int32()),
    pa.field("window_row", pa.int32()),
    pa.field("window_px", pa.int32()),
    pa.field("footprint_wkb", pa.binary()),  # EPSG:4326
    pa.field("cell_token", pa.string()),
    pa.field("round", pa.int32()),
])


def _decided(detections: gpd.GeoDataFrame, validation_decisions: pa.Table, decisions: tuple[str, ...]) -> list:
    if len(detections) != validation_decisions.num_rows:
        raise ValueError(f"{len(detections)} detections but {validation_decisions.num_rows} validation decisions")
    labels = validation_decisions["decision"].to_pylist()
    return [g for g, d in zip(detections.geometry, labels) if d in decisions]


def rejected_queries(detections: gpd.GeoDataFrame, validation_decisions: pa.Table,
                     max_hard_negatives: int = 64) -> gpd.GeoDataFrame:
    """The rejected detections that seed the mining (highest score first, as the backfill's hard negatives)."""
    return backfill.rejected_detections(detections, validation_decisions, max_hard_negatives)


def accepted_queries(detections: gpd.GeoDataFrame, validation_decisions: pa.Table,
                     max_backfill: int = 64) -> gpd.GeoDataFrame:
    """The accepted detections that seed find-more-like-this (highest score first)."""
    return backfill.accepted_detections(detections, validation_decisions, max_backfill)


def rejected_query_chips(rejected_queries: gpd.GeoDataFrame, detection_tiles: dict[str, Chip],
                         crop_px: int = 256) -> list[Chip]:
    """(3, crop_px, crop_px) chips centred on each rejected detection (those whose tile is known)."""
    return backfill.hard_negative_chips(rejected_queries, detection_tiles, crop_px)


def accepted_query_chips(accepted_queries: gpd.GeoDataFrame, detection_tiles: dict[str, Chip],
                         crop_px: int = 256) -> list[Chip]:
    """(3, crop_px, crop_px) chips centred on each accepted detection."""
    return backfill.accepted_chips(accepted_queries, detection_tiles, crop_px)


def _vectors(chips: list[Chip], encode_chips: EncodeChips) -> np.ndarray:
    return chip_embedding_vectors([c.rgb8() for c in chips], encode_chips)


def rejected_query_vectors(rejected_query_chips: list[Chip], encode_chips: EncodeChips) -> np.ndarray:
    """(Q, D) unit vectors of the rejected-detection chips."""
    return _vectors(rejected_query_chips, encode_chips)


def accepted_query_vectors(accepted_query_chips: list[Chip], encode_chips: EncodeChips) -> np.ndarray:
    """(Q, D) unit vectors of the accepted-detection chips."""
    return _vectors(accepted_query_chips, encode_chips)


def mining_exclusions(detections: gpd.GeoDataFrame, validation_decisions: pa.Table,
                      rejected_queries: gpd.GeoDataFrame, label_geometries: list) -> list:
    """Areas no mined negative may touch (EPSG:4326): accepted and needs-review detections (may be PV), the query
    detections (already hard negatives of the backfill) and every known PV label."""
    return (_decided(detections, validation_decisions, ("accept", "needs_review")) + list(rejected_queries.geometry)
            + list(label_geometries))


def similar_exclusions(detections: gpd.GeoDataFrame, validation_decisions: pa.Table, label_geometries: list) -> list:
    """Areas that are not "unlabelled": accepted and needs-review detections and known PV labels."""
    return _decided(detections, validation_decisions, ("accept", "needs_review")) + list(label_geometries)


def _overlapping(region_windows: pa.Table, geometries: list) -> list[str]:
    """uuids of the windows whose footprint intersects any of ``geometries``."""
    if not geometries or region_windows.num_rows == 0:
        return []
    footprints = shapely.from_wkb(region_windows["footprint_wkb"].to_pylist())
    tree = shapely.STRtree(footprints)
    hits = tree.query(np.asarray(geometries, dtype=object), predicate="intersects")
    uuids = region_windows["uuid"].to_pylist()
    return sorted({uuids[i] for i in np.unique(hits[1])})


def mining_excluded_windows(region_windows: pa.Table, mining_exclusions: list) -> list[str]:
    """Windows overlapping an accepted / needs-review / query detection or a label: never proposed as negatives."""
    return _overlapping(region_windows, mining_exclusions)


def similar_excluded_windows(region_windows: pa.Table, similar_exclusions: list) -> list[str]:
    """Windows overlapping an accepted / needs-review detection or a label: not searched for similar tiles."""
    return _overlapping(region_windows, similar_exclusions)


def _hits(chips: list[Chip], neighbours: Neighbours, round_index: int) -> list[dict[str, Any]]:
    rows = []
    for chip, hits in zip(chips, neighbours):
        for rank, hit in enumerate(hits):
            rows.append({"window_uuid": hit["uuid"], "source_detection": chip.extras["source_detection"],
                         "distance": float(hit["distance"]), "neighbour_rank": rank,
                         **{key: hit[key] for key in ("tile_path", "window_col", "window_row", "window_px",
                                                      "footprint_wkb", "cell_token")},
                         "round": round_index})
    return rows


def _nearest_per_window(rows: list[dict], limit: int | None = None) -> pa.Table:
    """One row per window (its smallest distance; ties: first source), nearest first, at most ``limit``."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["window_uuid"] not in best or row["distance"] < best[row["window_uuid"]]["distance"]:
            best[row["window_uuid"]] = row
    ordered = sorted(best.values(), key=lambda r: (r["distance"], r["window_uuid"]))
    return pa.Table.from_pylist(ordered[:limit] if limit is not None else ordered, schema=HIT_SCHEMA)


def mined_negative_proposals(rejected_query_chips: list[Chip], rejected_query_neighbours: Neighbours,
                             max_mined: int = 32, round_index: int = 0) -> pa.Table:
    """Windows nearest to the rejected detections (the job's search: ``mine_k`` each, no excluded window), one row
    per window at its nearest source detection, nearest first, at most ``max_mined``. Schema :data:`HIT_SCHEMA`."""
    return _nearest_per_window(_hits(rejected_query_chips, rejected_query_neighbours, round_index), max_mined)


def similar_tile_hits(accepted_query_chips: list[Chip], accepted_query_neighbours: Neighbours,
                      round_index: int = 0) -> pa.Table:
    """The nearest unlabelled windows of each accepted detection (the job's search: ``similar_k`` each), one row
    per window (nearest source), nearest first. Schema :data:`HIT_SCHEMA`."""
    return _nearest_per_window(_hits(accepted_query_chips, accepted_query_neighbours, round_index))


def cell_boosts(similar_tile_hits: pa.Table) -> dict[str, float]:
    """Grid-plan cell token → boost Σ (1 − d/2) over its similar windows (> 0 for every cell with a hit)."""
    boosts: dict[str, float] = {}
    for token, distance in zip(similar_tile_hits["cell_token"].to_pylist(), similar_tile_hits["distance"].to_pylist()):
        boosts[token] = boosts.get(token, 0.0) + max(1.0 - distance / 2.0, 1e-6)
    return dict(sorted(boosts.items()))

"""Read-only queries behind ``aegir browse``: versions, facets, filtered pages of chips with lon/lat footprints, and
one chip's pixels.

User input never reaches SQL as raw text: an S2 token must be hex and a valid cell no finer than the table's
finest stored level, a dataset or provenance must be one of the table's own facet values, a uuid must be a plain
identifier; what passes is quoted by :func:`aegir.store.lance_io.build_where_clause`. Bad input raises
:class:`BadQuery`. The S2 levels are those the table stores (``metadata.s2_token_l<level>``, read from its schema).
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import lance
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aegir.store import lance_io
from aegir.utils import s2geometry

MAX_PAGE = 500
NO_MASK = "none"  # provenance facet value of rows without a mask
_HEX = re.compile(r"[0-9a-f]{1,16}")
_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

_RECORD_COLUMNS = {
    "uuid": "uuid", "dataset": "metadata.dataset", "sample_id": "metadata.sample_id",
    "provenance": "metadata.mask_source", "backend": "metadata.provenance.backend",
    "round": "metadata.provenance.round", "created_at": "metadata.provenance.created_at",
    "acquired_at": "metadata.acquired_at", "pv_fraction": "metadata.pv_fraction",
    "lat": "metadata.centroid_lat", "lon": "metadata.centroid_lon",
}
_GRID_COLUMNS = {"crs": "metadata.crs", "transform": "metadata.transform", "shape": "metadata.vhr_shape"}


def _list_columns(levels: Sequence[int]) -> dict[str, str]:
    """{output name: column} of a chip page: record fields, ``l<level>`` per stored S2 level, grid fields."""
    s2 = {f"l{level}": f"metadata.s2_token_l{level}" for level in levels}
    return {**_RECORD_COLUMNS, **s2, **_GRID_COLUMNS}


class BadQuery(lance_io.StoreError):
    """A filter value, version, uuid or paging parameter that the table does not accept."""


@dataclass(frozen=True)
class ChipFilter:
    """Browse filters; ``None`` means any. ``s2`` is a token of any level ≤ 17."""

    dataset: str | None = None
    s2: str | None = None
    provenance: str | None = None


def s2_level(token: str, max_level: int = 17) -> int:
    """Level of a canonical lower-case S2 ``token`` (≤ ``max_level``); :class:`BadQuery` for anything else."""
    if not _HEX.fullmatch(token):
        raise BadQuery(f"S2 token {token!r} is not 1-16 lower-case hex digits")
    try:
        cell = s2geometry.token_to_cell_id(np.array([token]))
        level = int(s2geometry.cell_level(cell)[0])
    except ValueError as exc:
        raise BadQuery(f"{token!r} is not a valid S2 cell token") from exc
    if str(s2geometry.cell_id_to_token(cell)[0]) != token:
        raise BadQuery(f"S2 token {token!r} is not canonical (no trailing zeros)")
    if level > max_level:
        raise BadQuery(f"S2 token {token!r} is level {level}; chips carry cells down to level {max_level}")
    return level


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _footprints(rows: pa.Table) -> list[list[list[float]] | None]:
    """Chip footprint rings (4 corners, lon/lat) from crs + transform + shape; None where not georeferenced."""
    from affine import Affine
    from rasterio.warp import transform as warp

    from aegir.utils.geo import PIXEL_GRID_CRS

    out: list[list[list[float]] | None] = [None] * rows.num_rows
    crs_values = rows["crs"].to_pylist()
    pixel_grid = PIXEL_GRID_CRS.to_string()
    for crs in {c for c in crs_values if c and c != pixel_grid}:
        idx = [i for i, c in enumerate(crs_values) if c == crs]
        xs, ys = [], []
        for i in idx:
            aff, (_, h, w) = Affine(*rows["transform"][i].as_py()[:6]), rows["shape"][i].as_py()
            for col, row in ((0, 0), (w, 0), (w, h), (0, h)):
                x, y = aff @ (col, row)
                xs.append(x)
                ys.append(y)
        lons, lats = warp(crs, "EPSG:4326", xs, ys)
        for k, i in enumerate(idx):
            out[i] = [[round(lons[j], 7), round(lats[j], 7)] for j in range(4 * k, 4 * k + 4)]
    return out


def _chip_records(rows: pa.Table, levels: Sequence[int]) -> list[dict[str, Any]]:
    footprints = _footprints(rows)
    records = []
    for row, footprint in zip(rows.select([c for c in rows.column_names if c not in _GRID_COLUMNS])
                              .to_pylist(), footprints):
        pv = row["pv_fraction"]
        records.append({
            "uuid": row["uuid"], "sample_id": row["sample_id"], "dataset": row["dataset"],
            "s2": {f"l{level}": row[f"l{level}"] for level in levels},
            "provenance": row["provenance"] or NO_MASK, "backend": row["backend"], "round": row["round"],
            "acquired_at": _iso(row["acquired_at"]), "created_at": _iso(row["created_at"]),
            "pv_fraction": None if pv is None else round(pv, 5),
            "centroid": [round(row["lon"], 7), round(row["lat"], 7)], "footprint": footprint,
        })
    return records


def _levels(ds: lance.LanceDataset) -> tuple[int, ...]:
    """The S2 levels (ascending) the table stores as ``metadata.s2_token_l<level>``."""
    levels = lance_io.stored_s2_levels(ds.schema)
    if not levels:
        raise BadQuery(f"{ds.uri} stores no metadata.s2_token_l<level> fields")
    return levels


def _s2_cell_ring(token: str) -> list[list[float]]:
    ring = s2geometry.s2_cell_polygon(token, edge_points=4)
    ring = ring if ring.geom_type == "Polygon" else max(ring.geoms, key=lambda g: g.area)
    return [[round(x, 7), round(y, 7)] for x, y in ring.exterior.coords]


class BrowseSource:
    """One ``training_data`` table opened for reading at any of its versions (thread-safe, cached per version)."""

    def __init__(self, uri: str | None, lancedb_root: str) -> None:
        table = lance_io.open_training_table(uri, lancedb_root, create=False)
        self.location: str = table.to_lance().uri
        self._lock = threading.Lock()
        self._datasets: dict[int, lance.LanceDataset] = {}
        self._facets: dict[int, dict[str, Any]] = {}

    def versions(self) -> list[dict[str, Any]]:
        """Every version, oldest first: ``version``, ``timestamp`` (ISO) and ``rows``."""
        out = []
        for v in lance.dataset(self.location).versions():
            rows = (v.get("metadata") or {}).get("total_rows")
            out.append({"version": int(v["version"]), "timestamp": _iso(v["timestamp"]), "rows": int(rows or 0)})
        return sorted(out, key=lambda v: v["version"])

    def dataset(self, version: int | None = None) -> lance.LanceDataset:
        """The table at ``version`` (latest when None); :class:`BadQuery` for a version that does not exist."""
        if version is None:
            version = int(lance.dataset(self.location).version)
        with self._lock:
            if version in self._datasets:
                return self._datasets[version]
        known = [v["version"] for v in self.versions()]
        if version not in known:
            raise BadQuery(f"version {version} does not exist (versions: {known[0]}..{known[-1]})")
        ds = lance.dataset(self.location, version=version)
        with self._lock:
            return self._datasets.setdefault(version, ds)

    def facets(self, version: int | None = None) -> dict[str, Any]:
        """Rows, distinct datasets / provenances / S2 cells of the coarsest stored level (``s2_l<level>``, level
        10 by default) with counts, and the centroid extent."""
        ds = self.dataset(version)
        with self._lock:
            if ds.version in self._facets:
                return self._facets[ds.version]
        coarsest = _levels(ds)[0]
        cols = ds.to_table(columns={"dataset": "metadata.dataset", "provenance": "metadata.mask_source",
                                    "cells": f"metadata.s2_token_l{coarsest}", "lat": "metadata.centroid_lat",
                                    "lon": "metadata.centroid_lon"})

        def counts(name: str) -> list[dict[str, Any]]:
            values = [v or NO_MASK for v in cols[name].to_pylist()]
            return [{"value": k, "count": n} for k, n in sorted(Counter(values).items())]

        extent = None
        if cols.num_rows:
            lon, lat = pc.min_max(cols["lon"]), pc.min_max(cols["lat"])
            extent = [lon["min"].as_py(), lat["min"].as_py(), lon["max"].as_py(), lat["max"].as_py()]
        facets = {"version": int(ds.version), "rows": cols.num_rows, "datasets": counts("dataset"),
                  "provenances": counts("provenance"), f"s2_l{coarsest}": counts("cells"), "extent": extent}
        with self._lock:
            return self._facets.setdefault(ds.version, facets)

    def _where(self, facets: dict[str, Any], chip_filter: ChipFilter, levels: Sequence[int]
               ) -> tuple[dict[str, Any], int | None]:
        """The store filter dict for ``chip_filter`` and the S2 level that still needs an exact post-filter
        (``levels``: the table's stored S2 levels, ascending)."""
        where: dict[str, Any] = {}
        for name, field, value in (("dataset", "metadata.dataset", chip_filter.dataset),
                                   ("provenance", "metadata.mask_source", chip_filter.provenance)):
            if value is None:
                continue
            known = [f["value"] for f in facets[f"{name}s"]]
            if value not in known:
                raise BadQuery(f"unknown {name} {value!r} (known: {', '.join(known) or 'none'})")
            where[field] = None if (name == "provenance" and value == NO_MASK) else value
        if chip_filter.s2 is None:
            return where, None
        level = s2_level(chip_filter.s2, levels[-1])
        stored = max((lv for lv in levels if lv <= level), default=None)
        if stored is not None:
            where[f"metadata.s2_token_l{stored}"] = str(s2geometry.parent_tokens([chip_filter.s2], stored)[0])
        return where, None if level in levels else level

    def chips(self, chip_filter: ChipFilter, version: int | None = None, limit: int = 60,
              offset: int = 0) -> dict[str, Any]:
        """One page of matching chips (ordered by dataset, sample id, uuid), the total, and the S2 cell outline."""
        if not 1 <= limit <= MAX_PAGE or offset < 0:
            raise BadQuery(f"limit must be 1..{MAX_PAGE} and offset ≥ 0 (got {limit}, {offset})")
        ds = self.dataset(version)
        levels = _levels(ds)
        where, exact_level = self._where(self.facets(ds.version), chip_filter, levels)
        clause = lance_io.build_where_clause(where, ds.schema)
        rows = ds.to_table(columns=_list_columns(levels), filter=clause)
        if exact_level is not None and rows.num_rows:
            finest = rows[f"l{levels[-1]}"].to_numpy(zero_copy_only=False)
            rows = rows.filter(pa.array(s2geometry.parent_tokens(finest, exact_level) == chip_filter.s2))
        rows = rows.sort_by([("dataset", "ascending"), ("sample_id", "ascending"), ("uuid", "ascending")])
        return {"version": int(ds.version), "total": rows.num_rows, "offset": offset, "limit": limit,
                "s2_cell": _s2_cell_ring(chip_filter.s2) if chip_filter.s2 else None,
                "chips": _chip_records(rows.slice(offset, limit), levels)}

    def chip_row(self, uuid: str, version: int | None = None) -> dict[str, Any] | None:
        """The pixels, mask and metadata of one chip, or None when no row has ``uuid``."""
        if not _UUID.fullmatch(uuid):
            raise BadQuery(f"{uuid[:80]!r} is not a chip uuid")
        ds = self.dataset(version)
        clause = lance_io.build_where_clause({"uuid": uuid}, ds.schema)
        columns = ["uuid", "vhr_image_chip", "generated_mask", "metadata"]
        columns += ["truth_mask"] if "truth_mask" in ds.schema.names else []  # versions before the column lack it
        rows = ds.to_table(columns=columns, filter=clause,
                           limit=1).to_pylist()
        return rows[0] if rows else None

"""Spatially disjoint hold-out parts of a labelled image set: whole S2 cells go to one part each.

Pure functions; inputs are image centres (lon, lat, EPSG:4326 degrees), an S2 level and the wanted shares.
"""

from __future__ import annotations

import hashlib

import numpy as np

from aegir.utils import s2geometry


def _cell_order(cells: list[str], salt: str) -> list[str]:
    """The distinct cells, largest first, ties in the order of sha256(``salt:token``): deterministic, different
    per salt (placing the big cells first lets the small ones even the parts out)."""
    return sorted(set(cells), key=lambda c: (-cells.count(c), hashlib.sha256(f"{salt}:{c}".encode()).hexdigest()))


def holdout_parts(centres_lonlat: np.ndarray, level: int, shares: dict[str, float], salt: str) -> list[str]:
    """The part of every image ((N, 2) lon/lat centres): ``labelled`` or one of ``shares``' names.

    Cells at ``level`` are taken largest first (ties in salted-hash order) and each goes, whole, to the part with
    the most images still missing from its target count (share × N; ``labelled`` takes the rest), so parts never
    share a cell, a small part is filled with small cells, and sizes come as close to the shares as the cell sizes
    allow; ties between parts go by a salted order of their names."""
    tokens = s2geometry.s2_tokens(centres_lonlat[:, 1], centres_lonlat[:, 0], level).tolist()
    counts = {c: tokens.count(c) for c in set(tokens)}
    total = len(tokens)
    targets = {name: share * total for name, share in shares.items() if share > 0}
    targets["labelled"] = total - sum(targets.values())
    targets = dict(sorted(targets.items(), key=lambda item: hashlib.sha256(f"{salt}:{item[0]}".encode()).hexdigest()))
    filled = {name: 0 for name in targets}
    part_of: dict[str, str] = {}
    for cell in _cell_order(tokens, salt):
        name = max(targets, key=lambda n: targets[n] - filled[n])
        part_of[cell] = name
        filled[name] += counts[cell]
    return [part_of[t] for t in tokens]

"""EarthView shards in the imagery catalog: one image per (row, revisit) of a Satellogic EarthView Parquet shard,
catalogued as ``<absolute shard path>#row=<i>&revisit=<r>`` with ``image_id`` = SHA-256 of (shard content hash, row,
revisit). Real shards are not available offline: tested on shards written in the published layout
(:mod:`aegir.store.earthview`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from aegir.store.imagery_files import ImageHeader, ImageryError, content_hash
from aegir.utils.types import Chip

EARTHVIEW_CONVENTION = "earthview"


def earthview_uri(shard: str | Path, row: int, revisit: int) -> str:
    """The catalog uri of one EarthView image: ``<absolute shard path>#row=<i>&revisit=<r>`` (0-based row of the
    shard and revisit of that row)."""
    return f"{Path(shard).resolve()}#row={int(row)}&revisit={int(revisit)}"


def parse_earthview_uri(uri: str) -> tuple[str, int, int]:
    """(shard path, row, revisit) of an :func:`earthview_uri`; :class:`ImageryError` for another form."""
    shard, _, fragment = uri.rpartition("#")
    try:
        parts = dict(item.split("=", 1) for item in fragment.split("&"))
        return shard, int(parts["row"]), int(parts["revisit"])
    except (KeyError, ValueError) as exc:
        raise ImageryError(f"{uri}: not an EarthView image uri (<shard>#row=<i>&revisit=<r>)") from exc


def earthview_image_id(shard_hash: str, row: int, revisit: int) -> str:
    """``image_id`` of one EarthView image: SHA-256 of (shard content hash, row, revisit), first 32 hex digits."""
    return hashlib.sha256(f"{shard_hash}:{int(row)}:{int(revisit)}".encode()).hexdigest()[:32]


def is_earthview_shard(path: str | Path) -> bool:
    """True when ``path`` is a Parquet file whose columns are EarthView's (``metadata`` + a product column)."""
    import pyarrow.parquet as pq

    from aegir.store.earthview import looks_like_earthview

    try:
        return looks_like_earthview(pq.read_schema(path).names)
    except (OSError, ValueError):
        return False


def _iso_time(text: str | None) -> dt.datetime | None:
    """An ISO timestamp as an aware datetime (UTC when naive); None when absent or unparseable."""
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _earthview_row_chips(table: pa.Table, shard: Path) -> list[Chip]:
    """The chips of one shard row exactly as :func:`aegir.store.earthview.earthview_chips` makes them, on the
    row's :func:`~aegir.store.earthview.earthview_row_layout`; :class:`ImageryError` naming shard + row + reason."""
    from aegir.store import earthview

    row = table[earthview.ROW_COLUMN][0].as_py()
    where = f"{table[earthview.FILE_COLUMN][0].as_py()} row {row}: "
    try:
        subset, products = earthview.earthview_row_layout(table)
        return earthview.earthview_chips(table, subset, products)
    except (ValueError, TypeError, KeyError) as exc:
        raise ImageryError(f"{shard}#row={row}: {str(exc).removeprefix(where)}") from exc


def earthview_headers(shard: str) -> Iterator[ImageHeader | ImageryError]:
    """One header per (row, revisit) image of an EarthView shard (grid, bands, time and sensor from the row's
    metadata, as ``earthview_chips`` computes them), or the :class:`ImageryError` of a row that cannot be placed.
    ``size_bytes`` is the image's decoded pixel bytes (the shard holds many images)."""
    from aegir.store import earthview

    path = Path(shard).resolve()
    if not is_earthview_shard(path):
        yield ImageryError(f"{shard}: not an EarthView shard (a Parquet file with a 'metadata' column and product "
                           f"columns such as {', '.join(earthview.DEFAULT_PRODUCTS['satellogic'])})")
        return
    shard_hash = content_hash(path)
    try:
        for table in earthview.earthview_shard_rows(str(path)):
            try:
                chips = _earthview_row_chips(table, path)
            except ImageryError as exc:
                yield exc
                continue
            row = table[earthview.ROW_COLUMN][0].as_py()
            for chip in chips:
                revisit = chip.extras["revisit"]
                yield ImageHeader(
                    uri=earthview_uri(path, row, revisit), image_id=earthview_image_id(shard_hash, row, revisit),
                    size_bytes=int(chip.pixels.nbytes), crs=chip.crs, transform=chip.transform,
                    width=chip.width, height=chip.height, bands=chip.bands, dtype=str(chip.pixels.dtype),
                    grid_convention=EARTHVIEW_CONVENTION, sensor=chip.sensor, acquired_at=_iso_time(chip.acquired_at),
                    extras={"earthview_shard": str(path), "row": row, "revisit": revisit,
                            "subset": chip.extras["subset"], "products": list(chip.extras["products"])})
    except ValueError as exc:  # the shard itself became unreadable part-way
        yield ImageryError(f"{shard}: {exc}")


def earthview_chip(uri: str, image_id: str) -> Chip:
    """The Chip of one catalogued EarthView image (``source`` = its uri), after checking the shard's hash."""
    from aegir.store import earthview

    shard, row, revisit = parse_earthview_uri(uri)
    if not Path(shard).is_file():
        raise ImageryError(f"{uri}: catalogued image is gone (the shard no longer exists); re-register its folder")
    if earthview_image_id(content_hash(shard), row, revisit) != image_id:
        raise ImageryError(f"{uri}: the shard changed since it was catalogued (content hash differs from "
                           f"{image_id}); re-register it with `aegir imagery register`")
    rows = earthview.earthview_shard_rows(shard, [row])
    try:
        table = next(rows, None)
    except ValueError as exc:
        raise ImageryError(f"{uri}: cannot read the image ({exc})") from exc
    finally:
        rows.close()
    chips = [] if table is None else _earthview_row_chips(table, Path(shard))
    chip = next((c for c in chips if c.extras["revisit"] == revisit), None)
    if chip is None:
        raise ImageryError(f"{uri}: the shard has no row {row} revisit {revisit}")
    return dataclasses.replace(chip, source=uri, extras={**chip.extras, "row": row,
                                                         "grid_convention": EARTHVIEW_CONVENTION})



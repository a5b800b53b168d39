"""STAC static catalogs (pystac): items filtered by a lon/lat bbox and a datetime (range), and the asset window
of every item that meets the requested window as a :class:`aegir.utils.types.Chip` (read by :mod:`.rasters`)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

import pystac

from aegir.store import rasters
from aegir.store.rasters import RasterWindow
from aegir.utils.types import Chip


def stac_catalog(stac_catalog_href: str) -> pystac.Catalog:
    """The static STAC catalog (or collection) at ``stac_catalog_href`` (local path or URL)."""
    try:
        return pystac.Catalog.from_file(stac_catalog_href)
    except Exception as exc:  # pystac raises several types (IO, JSON, STACTypeError)
        raise ValueError(f"{stac_catalog_href}: cannot read a STAC catalog ({exc})") from exc


def _parse_instant(text: str, end: bool) -> dt.datetime:
    """ISO date or datetime → aware UTC datetime; a bare date as the start (or ``end``) of its day."""
    value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if len(text) <= 10 and end:
        value = value + dt.timedelta(days=1) - dt.timedelta(microseconds=1)
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _item_interval(item: pystac.Item) -> tuple[dt.datetime | None, dt.datetime | None]:
    """(start, end) of an item: its datetime, or start_datetime/end_datetime."""
    if item.datetime is not None:
        return item.datetime, item.datetime
    common = item.common_metadata
    return common.start_datetime, common.end_datetime


def _item_in_time(item: pystac.Item, stac_datetime: str) -> bool:
    """Whether the item's time overlaps ``stac_datetime`` ('date', 'start/end', '../end' or 'start/..')."""
    start_text, end_text = stac_datetime.split("/", 1) if "/" in stac_datetime else (stac_datetime, stac_datetime)
    lo = None if start_text in ("", "..") else _parse_instant(start_text, end=False)
    hi = None if end_text in ("", "..") else _parse_instant(end_text, end=True)
    start, end = _item_interval(item)
    if start is None or end is None:
        return False
    return (hi is None or start <= hi) and (lo is None or end >= lo)


def _bbox_intersects(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether two (minx, miny, maxx, maxy) boxes touch or overlap."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def stac_items(
    stac_catalog: pystac.Catalog, stac_bbox: Sequence[float] | None = None, stac_datetime: str | None = None
) -> list[pystac.Item]:
    """Items of the catalog (recursive) whose bbox meets ``stac_bbox`` (lon/lat: minx, miny, maxx, maxy) and
    whose datetime meets ``stac_datetime`` ('2021-03-19', '2021-01-01/2021-12-31', open ends '..')."""
    items = list(stac_catalog.get_items(recursive=True))
    if stac_bbox is not None:
        items = [item for item in items if item.bbox is not None and _bbox_intersects(item.bbox, stac_bbox)]
    if stac_datetime is not None:
        items = [item for item in items if _item_in_time(item, stac_datetime)]
    return items


def _asset_for(item: pystac.Item, asset_key: str | None) -> tuple[str, pystac.Asset]:
    """The named asset, else the first asset with role 'data' or a GeoTIFF media type."""
    if asset_key is not None:
        if asset_key not in item.assets:
            raise ValueError(f"STAC item {item.id}: no asset {asset_key!r}; assets are {sorted(item.assets)}")
        return asset_key, item.assets[asset_key]
    for key, asset in item.assets.items():
        if "data" in (asset.roles or []) or (asset.media_type or "").startswith("image/tiff"):
            return key, asset
    raise ValueError(f"STAC item {item.id}: no data/GeoTIFF asset; assets are {sorted(item.assets)}")


def item_data_asset(item: pystac.Item, asset_key: str | None = None) -> pystac.Asset:
    """The item's named asset, else its first asset with role 'data' or a GeoTIFF media type (ValueError naming
    the item when it has none)."""
    return _asset_for(item, asset_key)[1]


def _asset_band_names(asset: pystac.Asset) -> list[str] | None:
    """Band names from the asset's ``eo:bands`` (STAC 1.0) or ``bands`` (STAC 1.1): name, else common_name."""
    bands = asset.extra_fields.get("eo:bands") or asset.extra_fields.get("bands")
    if not bands:
        return None
    return [band.get("name") or band.get("common_name") or f"band{i}" for i, band in enumerate(bands, start=1)]


def _item_sensor(item: pystac.Item) -> str:
    """``platform`` / ``constellation`` / first instrument of an item, 'unknown' when none."""
    props = item.properties
    instruments = props.get("instruments") or []
    return props.get("platform") or props.get("constellation") or (instruments[0] if instruments else "unknown")


def stac_asset_chips(
    stac_items: list[pystac.Item],
    raster_window: RasterWindow,
    stac_asset_key: str | None = None,
    band_selection: Sequence[int | str] | None = None,
    target_crs: str | None = None,
    target_gsd_m: float | None = None,
    resampling_method: str = "bilinear",
) -> list[Chip]:
    """The window of one asset (``stac_asset_key``, else the first data/GeoTIFF asset) of every item whose bbox
    meets the window, as Chips (``acquired_at`` from the item, ``extras`` item id and asset key).

    Band names come from the asset's ``eo:bands`` when present (so ``band_selection`` may use them).
    """
    window_box = rasters.window_lonlat_bounds(raster_window)
    chips = []
    for item in stac_items:
        if item.bbox is not None and not _bbox_intersects(item.bbox, window_box):
            continue
        key, asset = _asset_for(item, stac_asset_key)
        start, _ = _item_interval(item)
        chips.append(rasters.raster_chip(
            asset.get_absolute_href() or asset.href, raster_window, band_selection, target_crs, target_gsd_m,
            resampling_method, band_names=_asset_band_names(asset), sensor=_item_sensor(item),
            acquired_at=start.isoformat() if start else None, extras={"stac_item": item.id, "stac_asset": key},
        ))
    return chips

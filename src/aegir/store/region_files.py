"""Region inference file I/O: the tile-folder index, per-tile window reads, AOI files, probability COGs and the
detection and installation files (GeoParquet + GeoPackage).

A tile's grid comes from the file's own georeference (GeoTIFF, world file) or else from its name (the Jiang PV01
and Google-static conventions of :mod:`aegir.utils.geo`); indexing opens only the file header, so a tile whose
pixels are damaged is still placed and fails when a cell reads it. GeoTIFF tiles are read by window (only the
pixels a cell needs; GDAL's block cache keeps the blocks neighbouring cells share); PNG/BMP tiles have no windowed
read and are decoded whole (640² px for the Austin tiles), once while they stay among the last 32 read.
Installations (detections merged per plan) are written like the detections.
"""

from __future__ import annotations

import functools
import glob
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import rasterio
import shapely
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.warp import transform_bounds

from aegir.store import image_files, mask_files
from aegir.utils import geo
from aegir.utils.types import Chip

NAMED_TILE_CACHE = 32  # decoded whole tiles kept (640² RGB: 1.2 MB each)
GEO_SUFFIXES = (".geojson", ".json", ".gpkg", ".parquet", ".geoparquet", ".shp", ".fgb")


@dataclass(frozen=True)
class TileRef:
    """One tile of a region: ``path``; grid ``crs`` + ``transform`` (pixel corners) of ``width`` × ``height`` px;
    ``footprint`` (shapely polygon, EPSG:4326); ``named`` when the grid comes from the file name."""

    path: str
    crs: CRS
    transform: Affine
    width: int
    height: int
    footprint: shapely.Geometry
    named: bool

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs`` units."""
        return geo.grid_bounds(self.transform, self.width, self.height)


REMOTE_PREFIXES = ("http://", "https://", "s3://", "gs://", "/vsi")
RASTER_SUFFIXES = (*image_files.IMAGE_SUFFIXES, ".vrt")
STAC_SUFFIXES = (".json",)


def is_remote_source(source: str) -> bool:
    """A URL or GDAL virtual path (read remotely), not a local file."""
    return source.startswith(REMOTE_PREFIXES)


def _gdal_path(source: str) -> str:
    """What rasterio opens: URLs as given (GDAL reads COGs by HTTP range requests), local paths as paths."""
    return source if is_remote_source(source) else str(Path(source))


def _raster_header(source: str) -> tuple[CRS | None, Affine, int, int] | None:
    """(crs or None, transform, width, height) from the file header; None when the header is unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            with rasterio.open(_gdal_path(source)) as dataset:
                return dataset.crs, dataset.transform, dataset.width, dataset.height
        except RasterioIOError:
            return None


def _tile_ref(source: str) -> TileRef:
    """The tile's grid from its georeference, else from its name (ValueError naming the file when neither)."""
    header = _raster_header(source)
    if header is not None and header[0] is not None:
        crs, transform, width, height = header
        named = False
    else:
        if is_remote_source(source):
            raise ValueError("no georeference in the remote file (or it cannot be read)")
        size = header[2:] if header is not None else (None, None)
        grid = geo.named_tile_grid(geo.parse_tile_name(Path(source)), *size)
        crs, transform, width, height, named = grid.crs, grid.transform, grid.width, grid.height, True
    footprint = geo.footprint_lonlat(crs, geo.grid_bounds(transform, width, height))
    return TileRef(source, crs, transform, int(width), int(height), footprint, named)


def _stac_sources(href: str) -> list[str]:
    """The data asset (GeoTIFF / COG) of every item of a static STAC catalog or collection, absolute hrefs."""
    from aegir.store import stac

    catalog = stac.stac_catalog(href)
    catalog.make_all_asset_hrefs_absolute()
    return [stac.item_data_asset(item).get_absolute_href() for item in stac.stac_items(catalog)]


def tile_sources(source: str | Path) -> list[str]:
    """The rasters of one imagery source, sorted: a folder (its images and GDAL VRTs), a glob, one file (GeoTIFF /
    COG / mosaic VRT / named tile), a remote COG (``http(s)://``, ``s3://``, ``/vsi…``: read by range requests)
    or a static STAC catalog / collection (``*.json``: every item's data asset). FileNotFoundError naming the
    source when it holds no raster."""
    text = str(source)
    if is_remote_source(text):
        return _stac_sources(text) if text.lower().endswith(STAC_SUFFIXES) else [text]
    path = Path(text)
    if path.is_dir():
        found = sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in RASTER_SUFFIXES)
    elif path.is_file():
        found = _stac_sources(text) if path.suffix.lower() in STAC_SUFFIXES else [text]
    else:
        found = sorted(m for m in glob.glob(text) if Path(m).suffix.lower() in RASTER_SUFFIXES)
    if not found:
        raise FileNotFoundError(f"{source}: no imagery (a folder or glob of {', '.join(RASTER_SUFFIXES)} files, a "
                                "raster file, a COG URL or a STAC catalog)")
    return found


def tile_index(sources: str | Path | list[str]) -> tuple[list[TileRef], list[dict]]:
    """The placeable tiles of one or more imagery sources (see :func:`tile_sources`), in source order then
    sorted by name, and the others as {file, reason}. FileNotFoundError when a source holds no raster."""
    tiles, skipped = [], []
    for source in sources if isinstance(sources, list) else [sources]:
        for raster in tile_sources(source):
            try:
                tiles.append(_tile_ref(raster))
            except ValueError as exc:
                skipped.append({"file": raster, "reason": f"cannot place the tile: {exc}"})
    return tiles, skipped


def _clip_bounds(tile: TileRef, bounds: tuple[float, float, float, float], crs: CRS) -> tuple[float, ...]:
    """``bounds`` (in ``crs``) cut to the tile's extent, in ``crs``."""
    left, bottom, right, top = transform_bounds(tile.crs, crs, *tile.bounds, densify_pts=21)
    return (max(bounds[0], left), max(bounds[1], bottom), min(bounds[2], right), min(bounds[3], top))


@functools.lru_cache(maxsize=NAMED_TILE_CACHE)
def decoded_named_tile(path: str, mtime_ns: int) -> Chip:
    """A whole named PNG/BMP tile, decoded once while it stays among the last ``NAMED_TILE_CACHE`` tiles read
    (keyed by path and modification time; ``decoded_named_tile.cache_info()`` counts the decodes). Neighbouring
    cells share tiles, so without it every cell would decode each of its tiles again."""
    from aegir.store.rasters import named_tile_chip

    return named_tile_chip(path)


def _decode_named_tile(path: str) -> Chip:
    """A whole named tile decoded in a worker process (the pid that decoded it in ``extras["decoded_by"]``)."""
    from aegir.store.rasters import named_tile_chip

    chip = named_tile_chip(path)
    chip.extras["decoded_by"] = os.getpid()
    return chip


class NamedTileDecoder:
    """Named PNG/BMP tiles decoded in ``workers`` spawned processes, each tile once per run: a tile's decode is
    submitted the first time a cell asks for it (the engine's reader threads ask ``read_ahead`` cells before the
    model needs them, so the decodes overlap the model) and its result kept for the last ``NAMED_TILE_CACHE``
    tiles. :meth:`read_tile_window` is a drop-in ``tile_reader``; GeoTIFF / COG windows are read in the calling
    thread (GDAL releases the GIL and its block cache is shared there). Use as a context manager."""

    def __init__(self, workers: int) -> None:
        import collections
        import multiprocessing
        import threading
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self.futures: collections.OrderedDict = collections.OrderedDict()
        self.submitted = 0
        self._lock = threading.Lock()

    def __enter__(self) -> NamedTileDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _future(self, path: str, mtime_ns: int):
        with self._lock:
            key = (path, mtime_ns)
            if key not in self.futures:
                self.futures[key] = self.pool.submit(_decode_named_tile, path)
                self.submitted += 1
                while len(self.futures) > NAMED_TILE_CACHE:
                    self.futures.popitem(last=False)
            self.futures.move_to_end(key)
            return self.futures[key]

    def read_tile_window(self, tile: TileRef, bounds: tuple[float, float, float, float], crs: CRS) -> Chip:
        """:func:`read_tile_window`, with named tiles from the worker processes."""
        if not tile.named:
            return read_tile_window(tile, bounds, crs)
        return _checked_named_tile(tile, self._future(tile.path, os.stat(tile.path).st_mtime_ns).result())


def _checked_named_tile(tile: TileRef, chip: Chip) -> Chip:
    """``chip`` (a decoded named tile); ValueError naming the file when its size differs from the indexed grid."""
    if (chip.width, chip.height) != (tile.width, tile.height):
        raise ValueError(f"{tile.path}: tile is {chip.width}x{chip.height} px, indexed as {tile.width}x{tile.height}")
    return chip


def read_tile_window(tile: TileRef, bounds: tuple[float, float, float, float], crs: CRS) -> Chip:
    """The part of ``tile`` inside ``bounds`` ((left, bottom, right, top) in ``crs``) as a Chip on the tile's grid.

    GeoTIFFs: a windowed read of that part only. Named PNG/BMP tiles: the whole tile (no windowed read exists);
    a tile whose pixels differ in size from its indexed grid is a ValueError naming the file.
    """
    from aegir.store.rasters import RasterWindow, geotiff_chip

    if not tile.named:
        return geotiff_chip(_gdal_path(tile.path), RasterWindow(crs, bounds=_clip_bounds(tile, bounds, crs)))
    return _checked_named_tile(tile, decoded_named_tile(tile.path, os.stat(tile.path).st_mtime_ns))


def _bbox_geometry(text: str) -> shapely.Geometry | None:
    """A box from 'min_lon,min_lat,max_lon,max_lat' (commas or spaces), else None."""
    parts = text.replace(",", " ").split()
    try:
        values = [float(v) for v in parts]
    except ValueError:
        return None
    if len(values) != 4:
        return None
    min_lon, min_lat, max_lon, max_lat = values
    if not (min_lon < max_lon and min_lat < max_lat):
        raise ValueError(f"AOI bbox {text!r} must be min_lon,min_lat,max_lon,max_lat with min < max")
    return shapely.box(min_lon, min_lat, max_lon, max_lat)


def _aoi_from_text(text: str, source: str) -> shapely.Geometry:
    geometry = _bbox_geometry(text)
    if geometry is not None:
        return geometry
    try:
        return shapely.from_wkt(text.strip())
    except shapely.errors.GEOSException as exc:
        raise ValueError(f"AOI {source}: neither a bbox (min_lon,min_lat,max_lon,max_lat) nor WKT ({exc})") from exc


def _aoi_from_vector_file(path: Path) -> shapely.Geometry:
    frame = mask_files.read_vector_file(path, "an AOI")
    if frame.empty:
        raise ValueError(f"AOI {path}: the file holds no geometry")
    if frame.crs is None:
        raise ValueError(f"AOI {path}: the file has no CRS")
    return shapely.union_all(frame.to_crs(4326).geometry.values)


def read_aoi(aoi: str | Path) -> shapely.Geometry:
    """An AOI in EPSG:4326 from a vector file (GeoJSON, GeoPackage, GeoParquet, …; any CRS), a text file holding
    WKT (lon/lat) or a bbox, or a bbox string 'min_lon,min_lat,max_lon,max_lat'."""
    path = Path(aoi)
    if path.is_file():
        geometry = (_aoi_from_vector_file(path) if path.suffix.lower() in GEO_SUFFIXES
                    else _aoi_from_text(path.read_text(), str(path)))
    elif (geometry := _bbox_geometry(str(aoi))) is None:
        raise FileNotFoundError(f"AOI {aoi}: no such file, and not a bbox min_lon,min_lat,max_lon,max_lat")
    if geometry.is_empty:
        raise ValueError(f"AOI {aoi}: the geometry is empty")
    min_lon, min_lat, max_lon, max_lat = geometry.bounds
    if min_lon < -180 or max_lon > 180 or min_lat < -90 or max_lat > 90:
        raise ValueError(f"AOI {aoi}: bounds {geometry.bounds} are not lon/lat degrees (EPSG:4326)")
    return shapely.make_valid(geometry)


def write_probability_cog(raster: Chip, path: str | Path) -> Path:
    """A (1, H, W) uint8 probability Chip (0–255 ≙ 0–1) → Cloud-Optimized GeoTIFF (deflate, 256² blocks,
    averaged overviews, per-dataset mask = ``valid``). Written to a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    height, width = raster.pixels.shape[1:]
    with rasterio.open(partial, "w", driver="COG", width=width, height=height, count=1, dtype="uint8",
                       crs=raster.crs, transform=raster.transform, compress="deflate", blocksize=256,
                       overview_resampling="average") as dst:
        dst.write(raster.pixels[0], 1)
        dst.write_mask(np.ones((height, width), bool) if raster.valid is None else raster.valid)
        dst.update_tags(1, description="PV probability x 255")
    os.replace(partial, path)
    return path


def _geo_frame(rows: pa.Table, empty_column: str):
    """Rows with ``geometry_wkb`` (EPSG:4326) → a GeoDataFrame in EPSG:4326 (``empty_column`` only when the
    table holds neither rows nor a geometry column)."""
    import geopandas as gpd

    frame = rows.to_pandas() if rows.num_rows or rows.num_columns else None
    if frame is None or "geometry_wkb" not in frame.columns:
        return gpd.GeoDataFrame({empty_column: []}, geometry=gpd.GeoSeries([], crs=4326))
    geometry = gpd.GeoSeries(shapely.from_wkb(frame.pop("geometry_wkb").to_numpy()), crs=4326)
    return gpd.GeoDataFrame(frame, geometry=geometry, crs=4326)


def write_detections(rows: pa.Table, out_dir: str | Path, stem: str = "detections") -> tuple[Path, Path]:
    """``predicted_pv`` rows (``geometry_wkb`` EPSG:4326) → ``OUT/<stem>.parquet`` (GeoParquet) and
    ``OUT/<stem>.gpkg`` (GeoPackage); both replaced whole."""
    detections = _geo_frame(rows, "cell_token")
    out = Path(out_dir)
    return (mask_files.write_polygons(detections, out / f"{stem}.parquet"),
            mask_files.write_polygons(detections, out / f"{stem}.gpkg"))


def write_installations(rows: pa.Table, out_dir: str | Path, stem: str = "installations") -> tuple[Path, Path]:
    """``installations`` rows (``geometry_wkb`` EPSG:4326 Polygon / MultiPolygon) → ``OUT/<stem>.parquet``
    (GeoParquet, ``detection_ids`` a list of strings) and ``OUT/<stem>.gpkg`` (GeoPackage, layer ``<stem>``,
    MultiPolygon; ``detection_ids`` comma-separated text, as GeoPackage has no list type); both replaced whole."""
    installations = _geo_frame(rows, "installation_id")
    out = Path(out_dir)
    parquet = mask_files.write_polygons(installations, out / f"{stem}.parquet")
    if "detection_ids" in installations.columns:
        installations["detection_ids"] = installations["detection_ids"].map(lambda ids: ",".join(ids))
    return parquet, mask_files.write_polygons(installations, out / f"{stem}.gpkg")

"""Imagery sources of ``aegir infer region`` beyond named tiles, on the real Austin aerial pixels: a folder of
GeoTIFFs in EPSG:3857, one mosaic COG served by a local HTTP server that answers byte ranges (GDAL reads the COG
by range requests), a GDAL VRT mosaic and a static STAC catalog. Every source gives the same detections as the
named PNG tiles they were written from (same pixels, same grid), and installations inside the imagery."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely

from aegir.dataflows import region_inference
from aegir.pipelines.region import infer_region
from aegir.sample_data import AUSTIN_TILES, link_tile_block
from aegir.store import region_files
from aegir.store.rasters import named_tile_chip

from conftest import SHARED_DATA, make_settings
from test_region_inference import NAME_ROUNDING_DEG, DarkRoofs, _stub_checkpoint

AUSTIN = SHARED_DATA / AUSTIN_TILES


@pytest.fixture(scope="module")
def austin_sources(tmp_path_factory) -> dict[str, Path]:
    """2 × 2 Austin tiles as named PNGs, as EPSG:3857 GeoTIFFs, as one mosaic COG and as a VRT over the
    GeoTIFFs, plus a STAC catalog of the GeoTIFFs."""
    import pystac

    root = tmp_path_factory.mktemp("sources")
    named = link_tile_block(AUSTIN, root / "named", 2, 2)
    geotiffs = root / "geotiff"
    geotiffs.mkdir()
    catalog = pystac.Catalog("austin", "2 × 2 Austin tiles as GeoTIFFs")
    for png in sorted(named.glob("*.png")):
        chip = named_tile_chip(str(png))
        path = geotiffs / f"{png.stem}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=chip.width, height=chip.height, count=3, dtype="uint8",
                           crs=chip.crs, transform=chip.transform) as dst:
            dst.write(chip.pixels)
        footprint = region_files.tile_index(str(path))[0][0].footprint
        item = pystac.Item(png.stem, shapely.geometry.mapping(footprint), list(footprint.bounds),
                           None, {"start_datetime": "2019-01-01T00:00:00Z", "end_datetime": "2019-12-31T00:00:00Z"})
        item.add_asset("image", pystac.Asset(str(path), media_type=pystac.MediaType.GEOTIFF, roles=["data"]))
        catalog.add_item(item)
    catalog.normalize_and_save(str(root / "stac"), pystac.CatalogType.SELF_CONTAINED)
    tiles, _ = region_files.tile_index(named)
    grid = region_inference.mosaic_grid(shapely.union_all([t.footprint for t in tiles]), tiles, tiles, 0)
    mosaic = region_inference.cell_mosaic(region_inference.cell_chips(tiles, grid, region_files.read_tile_window),
                                          grid)
    cog = root / "cog" / "austin_mosaic.tif"
    cog.parent.mkdir()
    with rasterio.open(cog, "w", driver="COG", width=mosaic.width, height=mosaic.height, count=3, dtype="uint8",
                       crs=mosaic.crs, transform=mosaic.transform, blocksize=256, compress="deflate") as dst:
        dst.write(mosaic.pixels)
    vrt = geotiffs / "mosaic.vrt"
    vrt.write_text(_vrt_xml(sorted(geotiffs.glob("*.tif")), mosaic))
    return {"named": named, "geotiff": geotiffs, "cog": cog, "vrt": vrt, "stac": root / "stac" / "catalog.json"}


def _vrt_xml(tifs: list[Path], mosaic) -> str:
    """A GDAL VRT mosaic of GeoTIFFs that share the mosaic's grid (each placed at its pixel offset; listed last
    to first, since a VRT's later source wins where tiles overlap and the region mosaic keeps the first tile's)."""
    t = mosaic.transform
    bands = []
    for band in (1, 2, 3):
        sources = []
        for tif in reversed(tifs):
            with rasterio.open(tif) as src:
                col, row = (round(v) for v in ~t @ (src.transform.c, src.transform.f))
                sources.append(f'<SimpleSource><SourceFilename relativeToVRT="1">{tif.name}</SourceFilename>'
                               f'<SourceBand>{band}</SourceBand><SrcRect xOff="0" yOff="0" xSize="{src.width}" '
                               f'ySize="{src.height}"/><DstRect xOff="{col}" yOff="{row}" xSize="{src.width}" '
                               f'ySize="{src.height}"/></SimpleSource>')
        bands.append(f'<VRTRasterBand dataType="Byte" band="{band}">{"".join(sources)}</VRTRasterBand>')
    return (f'<VRTDataset rasterXSize="{mosaic.width}" rasterYSize="{mosaic.height}">'
            f"<SRS>{mosaic.crs.to_wkt()}</SRS><GeoTransform>{t.c}, {t.a}, {t.b}, {t.f}, {t.d}, {t.e}</GeoTransform>"
            f'{"".join(bands)}</VRTDataset>')


RANGE_SERVER = """
import http.server, pathlib, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = pathlib.Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data, ranged = path.read_bytes(), self.headers.get("Range")
        with open(sys.argv[2], "a") as log:
            log.write((ranged or "whole") + "\\n")
        if ranged:
            start, _, end = ranged.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[start : end + 1]
        else:
            self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a, **k: Handler(*a, directory=sys.argv[1], **k))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture()
def cog_url(austin_sources, tmp_path):
    """The mosaic COG served on loopback by a separate process that answers HTTP byte ranges (206), as an object
    store or a CDN does (a server in this process could not answer while GDAL holds the GIL); every request's
    Range header is logged to ``requests.log``."""
    script, log = tmp_path / "range_server.py", tmp_path / "requests.log"
    script.write_text(RANGE_SERVER)
    server = subprocess.Popen([sys.executable, str(script), str(austin_sources["cog"].parent), str(log)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}/{austin_sources['cog'].name}", log
    finally:
        server.kill()
        server.wait()


# 512-px model tiles: cell windows stay close to the cell (a window grows to one model tile where imagery allows),
# so the sources compare like for like; the shipped 1024-px tiling is tested in test_flywheel / test_region_inference
SMALL_TILES = {"tile_px": 512, "overlap_px": 64}


def _run(tmp_path: Path, name: str, source) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame, shapely.Geometry]:
    """Region inference (DarkRoofs stub, level-16 cells) on ``source``: detections, installations, footprint."""
    settings = make_settings(tmp_path / name)
    report = infer_region(settings, _stub_checkpoint(tmp_path), tmp_path / name / "out", source, plan_level=16,
                          model=DarkRoofs(), **SMALL_TILES)
    assert not report.failed, report.failed
    tiles, _ = region_files.tile_index(source)
    footprint = shapely.union_all([t.footprint for t in tiles])
    return (gpd.read_parquet(report.detections_parquet), gpd.read_parquet(report.installations_parquet), footprint)


def _same_detections(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame, rel: float = 1e-3) -> None:
    assert len(b) > 20 and len(a) == pytest.approx(len(b), rel=rel)
    assert a["area_m2"].sum() == pytest.approx(b["area_m2"].sum(), rel=rel)


@pytest.fixture(scope="module")
def named_run(austin_sources, tmp_path_factory):
    return _run(tmp_path_factory.mktemp("named"), "named", austin_sources["named"])


def test_a_geotiff_folder_in_epsg3857_gives_the_named_tiles_detections_and_installations(austin_sources, named_run,
                                                                                          tmp_path):
    detections, installations, footprint = _run(tmp_path, "geotiff", str(austin_sources["geotiff"] / "*.tif"))
    _same_detections(detections, named_run[0])
    assert len(installations) >= 1 and installations.crs.to_epsg() == 4326
    assert installations.geometry.covered_by(footprint.buffer(NAME_ROUNDING_DEG)).all()


def test_a_cog_over_http_is_read_by_range_requests(austin_sources, named_run, cog_url, tmp_path):
    url, log = cog_url
    detections, installations, footprint = _run(tmp_path, "cog", url)
    # one mosaic instead of four tiles: a cell near a tile edge now sees context across it (measured 3,989 vs
    # 4,014 components of dark pixels, 0.6 %), the pixels are the same
    _same_detections(detections, named_run[0], rel=0.02)
    assert installations.geometry.covered_by(footprint.buffer(NAME_ROUNDING_DEG)).all() and len(installations) >= 1
    requests = log.read_text().split()
    assert requests and all(r.startswith("bytes=") for r in requests)  # never the whole file


def test_a_vrt_mosaic_and_a_stac_catalog_index_the_same_imagery(austin_sources, named_run):
    (vrt,), _ = region_files.tile_index(str(austin_sources["vrt"]))
    stac, _ = region_files.tile_index(str(austin_sources["stac"]))
    named = named_run[2]
    assert len(stac) == 4 and {Path(t.path).name for t in stac} == {p.name for p in
                                                                   austin_sources["geotiff"].glob("*.tif")}
    for footprint in (vrt.footprint, shapely.union_all([t.footprint for t in stac])):
        assert shapely.symmetric_difference(footprint, named).area < 5e-3 * named.area  # placement rounding
    with rasterio.open(austin_sources["vrt"]) as src, rasterio.open(austin_sources["cog"]) as cog:
        assert np.array_equal(src.read(), cog.read())  # the VRT mosaics the GeoTIFFs exactly as the COG holds them


def test_a_source_without_imagery_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no imagery"):
        region_files.tile_index(str(tmp_path / "*.tif"))

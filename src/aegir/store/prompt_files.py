"""Prompt files: the prompts Arrow table as GeoParquet (EPSG:4326) and back."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import pyarrow as pa
import shapely


def write_prompts_geoparquet(prompts: pa.Table, path: str | Path) -> Path:
    """Write ``prompts`` (WKB column ``prompt_geometry``) as GeoParquet with geometry column ``geometry``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame = prompts.drop_columns(["prompt_geometry"]).to_pandas()
    geometry = shapely.from_wkb(prompts["prompt_geometry"].to_numpy(zero_copy_only=False))
    gpd.GeoDataFrame(frame, geometry=geometry, crs="EPSG:4326").to_parquet(path)
    return path


def write_image_prompts(prompts: pa.Table, labels: pa.Table, path: str | Path) -> Path:
    """Write label × image prompts (pixel coordinates per image, see
    :mod:`aegir.dataflows.label_image_join`) as GeoParquet whose geometry is the label (EPSG:4326), so QGIS shows
    where each prompt came from; the pixel-space polygon prior stays WKB in ``polygon_pixels_wkb``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wkb = labels["geometry_wkb"].to_numpy(zero_copy_only=False)
    geometry = shapely.from_wkb(wkb[prompts["label_index"].to_numpy()]) if prompts.num_rows else []
    gpd.GeoDataFrame(prompts.to_pandas(), geometry=geometry, crs="EPSG:4326").to_parquet(path)
    return path

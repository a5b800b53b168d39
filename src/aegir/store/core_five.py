"""Hamilton dataflow: Core-Five samples (HF dataset ``gajeshladhar/core-five``) → Chips, via xarray DataTree.

Every public function is a DAG node named for what it returns; parameters are other nodes or driver inputs.

Layout (verified from public code that reads the released files; the dataset card itself could not be read
here): one NetCDF-4 file per sample at ``src/datatree/<parent id>/<sample id>.nc`` (e.g.
``src/datatree/0c6061/0c605df4.nc``), opened with ``xarray.open_datatree(..., engine="netcdf4")``. Groups:
``s2`` (one variable per band B01..B12 incl. B8A, dims (time, y, x)), ``s1`` (``vv``, ``vh``), ``landsat``
(``blue green red nir08 swir16 swir22 lwir11``), ``modis`` (``sur_refl_b01..b07``) and ``hr/data`` (variable
``data``, dims (band, y, x), uint8, plus a ``metadata`` attribute); the root has an ``s2id`` attribute; every
group has ``x``/``y`` coordinates. Assumed (not verifiable offline): that ``x``/``y`` are pixel centres in a
projected CRS named CF/rioxarray-style (a ``spatial_ref`` grid-mapping variable with ``crs_wkt``; ``crs`` /
``epsg`` attributes are also accepted), and that the 3 ``hr`` bands are red, green, blue. A group without a
CRS is an error naming the file and group.

The real download keeps to the hub client: :func:`core_five_file` fetches one sample with
``huggingface_hub.hf_hub_download`` (``HF_HUB_OFFLINE=1`` / ``core_five_local_files_only`` use the cache only).
``datasets.load_dataset`` is not used: the samples are NetCDF DataTrees, for which ``datasets`` has no builder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError

from aegir.utils import geo
from aegir.utils.types import Chip

CORE_FIVE_REPO = "gajeshladhar/core-five"
MODALITIES = ("hr", "s2", "s1", "landsat", "modis")
BAND_ORDER = {
    "s2": ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"),
    "s1": ("vv", "vh"),
    "landsat": ("blue", "green", "red", "nir08", "swir16", "swir22", "lwir11"),
    "modis": tuple(f"sur_refl_b0{i}" for i in range(1, 8)),
}
SENSORS = {"hr": "vhr-rgb", "s2": "sentinel-2", "s1": "sentinel-1", "landsat": "landsat-8/9", "modis": "modis"}


def core_five_file(
    core_five_path: str | None = None,
    core_five_sample: str | None = None,
    core_five_repo_id: str = CORE_FIVE_REPO,
    core_five_revision: str | None = None,
    core_five_cache_dir: str | None = None,
    core_five_local_files_only: bool = False,
) -> str:
    """Local path of one Core-Five sample: ``core_five_path`` as is, or ``core_five_sample`` ('<parent>/<id>')
    fetched from the hub into the HF cache (``src/datatree/<parent>/<id>.nc``)."""
    if (core_five_path is None) == (core_five_sample is None):
        raise ValueError("give exactly one of core_five_path (a local .nc) or core_five_sample ('<parent>/<id>')")
    if core_five_path is not None:
        if not Path(core_five_path).is_file():
            raise FileNotFoundError(f"{core_five_path}: no such Core-Five sample file")
        return core_five_path
    from huggingface_hub import hf_hub_download  # imported here: only the download path needs the hub client

    filename = f"src/datatree/{core_five_sample.removesuffix('.nc')}.nc"
    try:
        return hf_hub_download(core_five_repo_id, filename, repo_type="dataset", revision=core_five_revision,
                               cache_dir=core_five_cache_dir, local_files_only=core_five_local_files_only)
    except Exception as exc:  # hub errors: offline and not cached, missing file, network
        raise ValueError(f"hf://datasets/{core_five_repo_id}/{filename}: cannot fetch the Core-Five sample "
                         f"({type(exc).__name__}: {exc})") from exc


def core_five_tree(core_five_file: str) -> xr.DataTree:
    """The sample's groups as a lazily loaded xarray DataTree (NetCDF-4 with groups)."""
    try:
        return xr.open_datatree(core_five_file, engine="netcdf4")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{core_five_file}: cannot open as a Core-Five NetCDF DataTree ({exc})") from exc


def _crs_from_attrs(attrs: dict) -> CRS | None:
    """CRS from CF/rioxarray grid-mapping or plain attributes (crs_wkt, spatial_ref, crs, epsg, proj:epsg)."""
    for key in ("crs_wkt", "spatial_ref", "crs", "epsg", "proj:epsg"):
        value = attrs.get(key)
        if value is None:
            continue
        try:
            return CRS.from_user_input(int(value) if isinstance(value, (np.integer, np.floating)) else value)
        except (CRSError, TypeError, ValueError):  # a malformed attribute: try the next source
            continue
    return None


def _group_crs(ds: xr.Dataset, root_attrs: dict, where: str) -> CRS:
    """The group's CRS: a variable's ``grid_mapping``, a ``spatial_ref``/``crs`` variable, then attributes."""
    names = [ds[v].attrs.get("grid_mapping") for v in ds.data_vars] + ["spatial_ref", "crs"]
    for name in names:
        if name and name in ds.variables and (crs := _crs_from_attrs(ds[name].attrs)) is not None:
            return crs
    for attrs in (ds.attrs, root_attrs):
        if (crs := _crs_from_attrs(attrs)) is not None:
            return crs
    raise ValueError(f"{where}: no CRS (no spatial_ref/crs grid mapping with crs_wkt, no crs/epsg attribute)")


def _axis_step(values: np.ndarray, name: str, where: str) -> float:
    """The regular spacing of a pixel-centre coordinate vector; error if irregular or too short."""
    if values.size < 2:
        raise ValueError(f"{where}: coordinate {name!r} has {values.size} value(s); need 2 to derive a grid")
    steps = np.diff(values.astype(np.float64))
    if not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9 * abs(steps[0])):
        raise ValueError(f"{where}: coordinate {name!r} is not regularly spaced")
    return float(steps[0])


def _stack(ds: xr.Dataset, modality: str, bands: Sequence[str] | None, where: str) -> tuple[xr.DataArray, tuple]:
    """(array with dims (..., band, y, x), band names) of the requested bands of a group."""
    if modality == "hr":
        if "data" not in ds.data_vars:
            raise ValueError(f"{where}: no 'data' variable; variables are {list(ds.data_vars)}")
        array = ds["data"]
        band_dim = next((d for d in array.dims if d not in ("x", "y")), None)
        array = array.expand_dims("band") if band_dim is None else array.rename({band_dim: "band"})
        count = array.sizes["band"]
        labels = [str(v) for v in array["band"].values] if "band" in array.coords else []
        names = tuple(labels) if labels and not all(s.isdigit() for s in labels) else (
            ("red", "green", "blue") if count == 3 else tuple(f"band{i}" for i in range(1, count + 1)))
        if bands is not None:
            missing = [b for b in bands if b not in names]
            if missing:
                raise ValueError(f"{where}: no bands {missing}; bands are {list(names)}")
            array, names = array.isel(band=[names.index(b) for b in bands]), tuple(bands)
        return array.transpose(..., "band", "y", "x"), names
    spatial = [v for v in ds.data_vars if {"x", "y"} <= set(ds[v].dims)]
    wanted = list(bands) if bands is not None else [b for b in BAND_ORDER.get(modality, ()) if b in spatial] or spatial
    missing = [b for b in wanted if b not in spatial]
    if missing or not wanted:
        raise ValueError(f"{where}: no band variables {missing or wanted}; variables are {spatial}")
    array = xr.concat([ds[b] for b in wanted], dim="band", coords="minimal", compat="override")
    return array.transpose(..., "band", "y", "x"), tuple(wanted)


def _hr_metadata(node: xr.DataTree) -> dict | str | None:
    """The ``metadata`` attribute of ``hr/data`` (JSON decoded when it is JSON text)."""
    value = node.attrs.get("metadata")
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def core_five_chips(
    core_five_tree: xr.DataTree,
    core_five_file: str,
    core_five_modality: str = "hr",
    core_five_bands: Sequence[str] | None = None,
) -> list[Chip]:
    """Chips of one modality of a sample: ``hr`` → one chip; ``s2``/``s1``/``landsat``/``modis`` → one chip per
    time step (``acquired_at`` from ``time``). Pixels (C, H, W) keep the stored dtype (floats keep NaN; ``valid``
    is False where every band is NaN); the grid comes from the x/y pixel-centre coordinates, made north-up."""
    if core_five_modality not in MODALITIES:
        raise ValueError(f"unknown Core-Five modality {core_five_modality!r}; one of {', '.join(MODALITIES)}")
    path = "hr/data" if core_five_modality == "hr" else core_five_modality
    where = f"{core_five_file} [{path}]"
    try:
        node = core_five_tree[path]
    except KeyError as exc:
        raise ValueError(f"{where}: group missing; groups are {sorted(core_five_tree.groups)}") from exc
    ds = node.to_dataset()
    array, names = _stack(ds, core_five_modality, core_five_bands, where)
    crs = _group_crs(ds, dict(core_five_tree.attrs), where)
    x, y = array["x"].values, array["y"].values
    dx, dy = _axis_step(x, "x", where), _axis_step(y, "y", where)
    if dy > 0:  # south-up storage: flip rows so the chip is north-up
        array, y, dy = array.isel(y=slice(None, None, -1)), y[::-1], -dy
    transform = Affine(dx, 0.0, float(x[0]) - dx / 2, 0.0, dy, float(y[0]) - dy / 2)
    values = array.values
    frames = values.reshape((-1, *values.shape[-3:]))
    times = array["time"].values.reshape(-1) if "time" in array.dims else [None] * frames.shape[0]
    extras = {"modality": core_five_modality, "sample_attrs": dict(core_five_tree.attrs)}
    if core_five_modality == "hr":
        extras["hr_metadata"] = _hr_metadata(node)
    chips = []
    for index, (frame, time) in enumerate(zip(frames, times)):
        valid = ~np.isnan(frame).all(axis=0) if np.issubdtype(frame.dtype, np.floating) else None
        chips.append(Chip(
            pixels=frame, crs=crs, transform=transform,
            gsd_m=geo.ground_gsd_m(transform, crs, frame.shape[2], frame.shape[1]), bands=names,
            source=f"{where}" + (f" time {index}" if time is not None else ""),
            valid=None if valid is None or valid.all() else valid, sensor=SENSORS[core_five_modality],
            acquired_at=None if time is None else pd.Timestamp(time).isoformat(), georeferenced=True,
            extras={**extras, "time_index": index if time is not None else None},
        ))
    return chips

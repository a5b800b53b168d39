"""Sentinel-2 product metadata: the product level, processing baseline and DN offset of a band folder, read from
the SAFE ``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml`` (in the folder or a parent up to the ``.SAFE`` root, or one product
below it) or a STAC item's ``s2:processing_baseline``; an explicit ``--processing-baseline`` is used only where the
metadata has none, and a folder with neither is an error, never a guess (:func:`msi_radiometry`, a Hamilton node).
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from aegir.utils import radiometry
from aegir.utils.radiometry import DN_SCALE


class MsiError(ValueError):
    """A Sentinel-2 file or folder that cannot be read as asked; the message names the file and the problem."""


_MTD_PATTERNS = ("MTD_MSIL1C.xml", "MTD_MSIL2A.xml", "*_MTD_SAFL1C_*.xml", "*_MTD_SAFL2A_*.xml")
_OFFSET_ELEMENT = {"L1C": "RADIO_ADD_OFFSET", "L2A": "BOA_ADD_OFFSET"}
_NO_BASELINE_HINT = (
    "pass --processing-baseline (e.g. 04.00 for products processed from 2022-01-25 on, 02.09 before)"
)


@dataclass(frozen=True)
class MsiRadiometry:
    """How a Sentinel-2 product's DNs become reflectance, and where that was learnt."""

    product_level: str  # "L1C" | "L2A"
    processing_baseline: str  # "04.00" style
    dn_offset: float  # DN units, added before dividing by 10000: 0 or -1000
    source: str  # where the baseline came from: path of MTD xml, STAC item path, or "--processing-baseline"


@dataclass(frozen=True)
class _Metadata:
    source: str
    product_level: str | None
    processing_baseline: str | None
    dn_offset: float | None  # the offset the file states, None when it states none


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element: ET.Element | None, name: str) -> ET.Element | None:
    if element is None:
        return None
    return next((c for c in element if _local(c.tag) == name), None)


def _text(element: ET.Element | None, name: str) -> str:
    found = _child(element, name)
    return (found.text or "").strip() if found is not None else ""


def _baseline_in(text: object, where: str) -> str:
    try:
        return radiometry.baseline_text(text)  # type: ignore[arg-type]
    except radiometry.RadiometryError as exc:
        raise MsiError(f"{where}: {exc}") from exc


def _stated_offset(values: dict[str, float], path: Path, what: str) -> float | None:
    if not values:
        return None
    if len(set(values.values())) > 1:
        raise MsiError(f"{path}: {what} differs between bands ({values}); a single offset per product is supported")
    return next(iter(values.values()))


def _read_mtd(path: Path) -> _Metadata:
    """Product level, baseline and stated offset of a SAFE product metadata file (ESA layout: ``n1:General_Info``
    / ``Product_Info`` / ``PROCESSING_BASELINE``, ``PRODUCT_TYPE``, ``PROCESSING_LEVEL``; offsets in
    ``Product_Image_Characteristics`` / ``Radiometric_Offset_List`` / ``RADIO_ADD_OFFSET`` (L1C) or
    ``BOA_ADD_OFFSET_VALUES_LIST`` / ``BOA_ADD_OFFSET`` (L2A))."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise MsiError(f"{path}: cannot read as Sentinel-2 product metadata ({exc})") from exc
    general = _child(root, "General_Info")
    info = _child(general, "Product_Info")
    if info is None:
        raise MsiError(f"{path}: no General_Info/Product_Info: not a Sentinel-2 product metadata file")
    named = re.search(r"MTD_(?:MSI|SAF)(L1C|L2A)", path.name)
    level = None
    for text in (  # S2MSI1C, Level-1C, n1:Level-1C_User_Product, MTD_MSIL1C.xml: the first that names a level
        _text(info, "PRODUCT_TYPE"),
        _text(info, "PROCESSING_LEVEL"),
        _local(root.tag).split("_")[0],
        named.group(1) if named else "",
    ):
        level = radiometry.product_level_of(text)
        if level is not None:
            break
    baseline_text = _text(info, "PROCESSING_BASELINE")
    baseline = _baseline_in(baseline_text, f"{path}: PROCESSING_BASELINE") if baseline_text else None
    offset = None
    if level is not None:
        values: dict[str, float] = {}
        for item in general.iter():
            if _local(item.tag) == _OFFSET_ELEMENT[level]:
                try:
                    values[item.get("band_id", str(len(values)))] = float((item.text or "").strip())
                except ValueError as exc:
                    raise MsiError(f"{path}: {_OFFSET_ELEMENT[level]} {item.text!r} is not a number") from exc
        offset = _stated_offset(values, path, _OFFSET_ELEMENT[level])
    return _Metadata(str(path), level, baseline, offset)


def _read_stac(path: Path) -> _Metadata | None:
    """The Sentinel-2 radiometry of a STAC item (``properties``: ``s2:processing_baseline``, ``s2:product_type``,
    ``processing:level``; reflectance assets' ``raster:bands`` ``scale``/``offset``), None for other JSON."""
    try:
        item = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    properties = item.get("properties") if isinstance(item, dict) else None
    if not isinstance(properties, dict) or properties.get("s2:processing_baseline") in (None, ""):
        return None
    value = properties["s2:processing_baseline"]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{float(value):05.2f}"
    baseline = _baseline_in(value, f"{path}: s2:processing_baseline")
    level = None
    for key in ("s2:product_type", "processing:level"):
        if properties.get(key) is not None:
            level = radiometry.product_level_of(properties[key])
            if level is not None:
                break
    values: dict[str, float] = {}
    assets = item.get("assets") if isinstance(item.get("assets"), dict) else {}
    for key, asset in sorted(assets.items()):
        bands = asset.get("raster:bands") if isinstance(asset, dict) else None
        first = bands[0] if isinstance(bands, list) and bands and isinstance(bands[0], dict) else {}
        scale, offset = first.get("scale"), first.get("offset")
        if isinstance(scale, (int, float)) and isinstance(offset, (int, float)) and math.isclose(scale, 1 / DN_SCALE):
            values[key] = round(float(offset) / float(scale), 6)  # reflectance = (DN + offset/scale) * scale
    return _Metadata(str(path), level, baseline, _stated_offset(values, path, "raster:bands offset"))


def _product_folders(folder: Path) -> list[Path]:
    """``folder`` and its parents up to the product root: a ``*.SAFE`` folder, or the folder holding ``GRANULE``
    (band files live in ``GRANULE/<id>/IMG_DATA[/R10m]``); just ``folder`` outside a SAFE tree."""
    chain = [folder, *folder.parents]
    for i, path in enumerate(chain):
        if path.suffix.upper() == ".SAFE":
            return chain[: i + 1]
        if path.name == "GRANULE":
            return chain[: i + 2]
    return [folder]


def _product_metadata(folder: Path) -> _Metadata | None:
    """The product metadata of ``folder``: the nearest SAFE ``MTD_MSI*.xml`` in it or a parent up to the product
    root, else the one below it (a folder holding one ``*.SAFE``), else a STAC item ``*.json`` in it."""
    for path in _product_folders(folder):
        found = sorted({m for pattern in _MTD_PATTERNS for m in path.glob(pattern) if m.is_file()})
        if len(found) > 1:
            raise MsiError(f"{path}: several product metadata files ({', '.join(m.name for m in found)})")
        if found:
            return _read_mtd(found[0])
    below = sorted({m for pattern in _MTD_PATTERNS for m in folder.rglob(pattern) if m.is_file()})
    if len(below) > 1:
        raise MsiError(f"{folder}: several Sentinel-2 products ({', '.join(str(m) for m in below)}); pass one")
    if below:
        return _read_mtd(below[0])
    items = [m for m in (_read_stac(p) for p in sorted(folder.glob("*.json")) if p.is_file()) if m is not None]
    if len({(m.processing_baseline, m.product_level, m.dn_offset) for m in items}) > 1:
        listed = ", ".join(f"{m.source} ({m.processing_baseline})" for m in items)
        raise MsiError(f"{folder}: STAC items disagree: {listed}")
    return items[0] if items else None


def msi_radiometry(
    msi_folder: str, processing_baseline: str | None = None, product_level: str | None = None
) -> MsiRadiometry:
    """Product level, processing baseline and DN offset of the Sentinel-2 product whose band files are in
    ``msi_folder``, read from its metadata, never guessed.

    Metadata: a SAFE ``MTD_MSIL1C.xml`` / ``MTD_MSIL2A.xml`` in the folder or a parent up to the ``*.SAFE`` root
    (``PROCESSING_BASELINE``, ``PRODUCT_TYPE``; the offset ``RADIO_ADD_OFFSET`` (L1C) / ``BOA_ADD_OFFSET`` (L2A)
    as stated there, else from the baseline: -1000 from 04.00 on, 0 before), or a STAC item ``*.json`` in the
    folder (``s2:processing_baseline``, ``s2:product_type`` / ``processing:level``, ``raster:bands`` offsets).
    ``processing_baseline`` ("NN.NN") stands in when there is no metadata; given with metadata it must agree.
    ``product_level`` ("L1C" / "L2A") likewise; default from the metadata, else "L1C". Raises :class:`MsiError`
    when the baseline is neither readable nor given, when argument and metadata disagree, or on malformed text.
    """
    folder = Path(msi_folder).absolute()
    if not folder.is_dir():
        raise MsiError(f"{msi_folder}: not a folder of Sentinel-2 band files")
    given = None if processing_baseline is None else _baseline_in(processing_baseline, "--processing-baseline")
    level_given = None
    if product_level is not None:
        level_given = product_level.strip().upper()
        if level_given not in _OFFSET_ELEMENT:
            raise MsiError(f"product level {product_level!r}: expected L1C or L2A")
    meta = _product_metadata(folder)
    if meta is not None and meta.product_level and level_given and meta.product_level != level_given:
        raise MsiError(
            f"{msi_folder}: product level {level_given} (argument) disagrees with {meta.product_level} in {meta.source}"
        )
    level = level_given or (meta.product_level if meta is not None else None) or "L1C"
    if meta is not None and meta.processing_baseline is not None:
        if given is not None and given != meta.processing_baseline:
            raise MsiError(
                f"{msi_folder}: --processing-baseline {given} disagrees with processing baseline "
                f"{meta.processing_baseline} in {meta.source}"
            )
        offset = meta.dn_offset
        if offset is None:
            offset = radiometry.dn_offset(level, meta.processing_baseline)
        return MsiRadiometry(level, meta.processing_baseline, float(offset), meta.source)
    if given is None:
        if meta is not None:
            raise MsiError(f"{msi_folder}: cannot read the Sentinel-2 processing baseline ({meta.source} has no "
                           f"PROCESSING_BASELINE); {_NO_BASELINE_HINT}")
        raise MsiError(f"{msi_folder}: cannot read the Sentinel-2 processing baseline (no MTD_MSI*.xml or STAC item "
                       f"with s2:processing_baseline); {_NO_BASELINE_HINT}")
    stated = meta.dn_offset if meta is not None else None  # an MTD without PROCESSING_BASELINE may state offsets
    offset = stated if stated is not None else radiometry.dn_offset(level, given)
    return MsiRadiometry(level, given, float(offset), "--processing-baseline")

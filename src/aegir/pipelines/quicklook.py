"""``aegir quicklook``: PNG panels of ``training_data`` chips (chip with its prompt outlined | mask overlay) and a
contact sheet of them, for a person to look at."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine
from PIL import Image
from rasterio.crs import CRS

from aegir.config import Settings
from aegir.store import lance_io, run_files
from aegir.store.chip_codec import decode_chip
from aegir.utils import geo
from aegir.utils.quicklook import chip_panel, decision_outlines
from aegir.utils.types import Chip

COLUMNS = ["uuid", "prompt_geometry", "vhr_image_chip", "generated_mask", "truth_mask", "metadata"]


def _row_chip(row: dict) -> Chip:
    meta = row["metadata"]
    pixels = decode_chip(row["vhr_image_chip"], meta["vhr_encoding"], meta["vhr_shape"], meta["vhr_dtype"])
    bands = tuple(f"b{i}" for i in range(pixels.shape[0]))
    return Chip(pixels, CRS.from_string(meta["crs"]), Affine(*meta["transform"][:6]), meta["gsd_m"] or float("nan"),
                bands, meta["source_file"])


def row_panel(row: dict) -> np.ndarray:
    """(H, 2W + 4, 3) uint8 panel of one ``training_data`` row (see :func:`aegir.utils.quicklook.chip_panel`)."""
    chip = _row_chip(row)
    meta = row["metadata"]
    mask = None
    stored = row.get("truth_mask") or row["generated_mask"]  # the training target: truth where the row has it
    if stored is not None:
        mask = decode_chip(stored, meta["mask_encoding"], meta["mask_shape"], "uint8")
        mask = mask.reshape(chip.height, chip.width)
    prompt = geo.burn_polygons(chip, [row["prompt_geometry"]]) if meta["crs"] != geo.PIXEL_GRID_CRS.to_string() \
        else None
    rgb = np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1))
    return chip_panel(rgb, mask, None if prompt is None else prompt.astype(bool))


def contact_sheet(panels: list[np.ndarray], columns: int = 4, width: int = 1200) -> np.ndarray:
    """Panels resized to one width and tiled ``columns`` per row (white background), (H, ``width``, 3) uint8."""
    cell = width // columns
    resized = [np.asarray(Image.fromarray(p).resize((cell, max(1, round(p.shape[0] * cell / p.shape[1])))))
               for p in panels]
    rows = [resized[i:i + columns] for i in range(0, len(resized), columns)]
    height = sum(max(p.shape[0] for p in r) for r in rows)
    sheet = np.full((height, width, 3), 255, np.uint8)
    top = 0
    for r in rows:
        for k, panel in enumerate(r):
            sheet[top:top + panel.shape[0], k * cell:k * cell + panel.shape[1]] = panel
        top += max(p.shape[0] for p in r)
    return sheet


def write_panels(named_panels: list[tuple[str, np.ndarray]], out_dir: str | Path) -> dict:
    """``OUT/<name>.png`` per (name, (H, W, 3) uint8 panel) and ``OUT/contact_sheet.png`` of them all (none when
    there are no panels): {"written": [paths], "contact_sheet": path | None}."""
    out = run_files.ensure_dir(out_dir)
    written = [str(run_files.write_png(panel, out / f"{name}.png")) for name, panel in named_panels]
    sheet = None
    if named_panels:
        panels = [panel for _, panel in named_panels]
        sheet = run_files.write_png(contact_sheet(panels, columns=min(4, len(panels))), out / "contact_sheet.png")
    return {"written": written, "contact_sheet": str(sheet) if sheet else None}


def candidate_quicklooks(panels: list[tuple], out_dir: str | Path) -> dict:
    """``OUT/<image>.png`` per (name, Chip, (H, W) candidate labels, decisions) — the image with each candidate
    outlined by its decision (accept green, reject red) — and ``OUT/contact_sheet.png``."""
    named = []
    for name, chip, labels, decisions in panels:
        accepted = [k + 1 for k, d in enumerate(decisions) if d == "accept"]
        regions = {"accept": np.isin(labels, accepted), "reject": (labels > 0) & ~np.isin(labels, accepted)}
        named.append((name, decision_outlines(np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1)), regions)))
    return write_panels(named, out_dir)


def quicklook_training_data(settings: Settings, uri: str | None, out_dir: str | Path,
                            filters: dict | None = None, limit: int = 16) -> dict:
    """``OUT/<sample_id>.png`` for up to ``limit`` rows matching ``filters`` (metadata field → value(s), quoted by
    :func:`aegir.store.lance_io.build_where_clause`) and ``OUT/contact_sheet.png``."""
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    rows = lance_io.filter_rows(table, filters or {}, columns=COLUMNS, limit=limit).to_pylist()
    named = [(Path(row["metadata"]["sample_id"]).name, row_panel(row)) for row in rows]
    return write_panels(named, out_dir) | {"rows": len(rows)}


def detection_quicklooks(detections, decisions: list[str], tiles: dict, out_dir: str | Path,
                         max_tiles: int = 8) -> dict:
    """``OUT/<tile>.png`` for the ``max_tiles`` tiles holding the most detections, each detection outlined by its
    validation decision (accept green, reject red, needs_review orange), and ``OUT/contact_sheet.png``.

    ``detections``: GeoDataFrame (EPSG:4326) with ``detection_id``; ``decisions``: one per detection, same order;
    ``tiles``: detection_id → the tile Chip holding it."""
    import shapely

    by_tile: dict[str, tuple] = {}
    for detection_id, geometry, decision in zip(detections["detection_id"].astype(str), detections.geometry,
                                                decisions):
        chip = tiles.get(detection_id)
        if chip is not None:
            entry = by_tile.setdefault(chip.source, (chip, {}))
            entry[1].setdefault(decision, []).append(shapely.to_wkb(geometry))
    busiest = sorted(by_tile.values(), key=lambda e: -sum(map(len, e[1].values())))[:max_tiles]
    named = []
    for chip, wkbs in busiest:
        regions = {d: geo.burn_polygons(chip, w) for d, w in wkbs.items()}
        rgb = np.ascontiguousarray(np.moveaxis(chip.rgb8(), 0, -1))
        panel = decision_outlines(rgb, {d: r.astype(bool) for d, r in regions.items() if r is not None})
        named.append((Path(chip.source).stem, panel))
    return write_panels(named, out_dir) | {"tiles": len(named)}

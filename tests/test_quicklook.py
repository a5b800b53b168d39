"""Quicklook pictures of real training_data chips and the flywheel summary plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from aegir.cli import app
from aegir.utils.quicklook import MASK_COLOUR, PROMPT_COLOUR, flywheel_summary_figure

from conftest import SHARED_DATA

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"


def test_cli_quicklook_overlays_the_stored_mask_on_the_chip(jiang_table, tmp_path):
    _, uri, _ = jiang_table
    result = CliRunner().invoke(app, ["quicklook", "--uri", uri, "--out", str(tmp_path), "--dataset", "jiang_pv01",
                                      "--limit", "5"])
    assert result.exit_code == 0, result.output
    panels = sorted(p for p in tmp_path.glob("PV01_*.png"))
    assert len(panels) == 5 and (tmp_path / "contact_sheet.png").is_file()
    stem = panels[0].stem
    panel = np.asarray(Image.open(panels[0]))
    image = np.asarray(Image.open(JIANG / "images" / f"{stem}.bmp").convert("RGB"))
    mask = np.asarray(Image.open(JIANG / "masks" / f"{stem}.bmp")) > 0
    assert panel.shape == (256, 2 * 256 + 4, 3)
    left, right = panel[:, :256], panel[:, 260:]
    # left: the chip, its prompt (the tile footprint) outlined at the border; right: PV pixels tinted magenta only
    assert np.array_equal(left[1:-1, 1:-1], image[1:-1, 1:-1]) and (left[0] == PROMPT_COLOUR).all()
    assert np.array_equal(right[~mask], image[~mask])
    tinted = right[mask].astype(float)
    expected = 0.45 * image[mask].astype(float) + 0.55 * MASK_COLOUR
    assert np.abs(tinted - expected).max() <= 1.0


def test_cli_quicklook_with_no_matching_rows_writes_nothing(jiang_table, tmp_path):
    _, uri, _ = jiang_table
    result = CliRunner().invoke(app, ["quicklook", "--uri", uri, "--out", str(tmp_path), "--dataset", "elsewhere"])
    assert result.exit_code == 0 and not list(tmp_path.glob("*.png"))


def test_flywheel_summary_plot_renders_every_round(tmp_path):
    table = [{"round": 0, "seed_test_iou": 0.86, "target_iou": 0.78, "target_object_f1": 0.15, "transfer_f1": 0.14,
              "pseudo_positive": 0, "pseudo_negative": 0},
             {"round": 1, "seed_test_iou": 0.87, "target_iou": None, "target_object_f1": 0.19, "transfer_f1": 0.15,
              "pseudo_positive": 15, "pseudo_negative": 3}]
    figure = flywheel_summary_figure(table)
    scores, counts = figure.axes
    assert [line.get_ydata()[1] for line in scores.lines][:1] + [line.get_ydata()[1] for line in scores.lines][2:] \
        == [0.87, 0.19, 0.15]
    assert np.isnan(scores.lines[1].get_ydata()[1])  # no target truth that round: a gap, not a zero
    assert sum(patch.get_height() for patch in counts.patches) == 15 + 3
    figure.savefig(tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").size == (900, 360)


def test_detection_quicklooks_outline_each_detection_in_its_decision_colour(tmp_path):
    import geopandas as gpd
    import shapely

    from aegir.pipelines.quicklook import detection_quicklooks
    from aegir.store import mask_files, region_files
    from aegir.utils.quicklook import DECISION_COLOURS

    austin = SHARED_DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"
    refs, _ = region_files.tile_index(austin)
    busy, quiet = refs[0], refs[1]
    chips = {ref.path: mask_files.read_image_chip(ref.path) for ref in (busy, quiet)}

    def box_in(ref, fx0, fy0, fx1, fy1):  # a lon/lat box at fractions of the tile's footprint
        x0, y0, x1, y1 = ref.footprint.bounds
        return shapely.box(x0 + fx0 * (x1 - x0), y0 + fy0 * (y1 - y0), x0 + fx1 * (x1 - x0), y0 + fy1 * (y1 - y0))

    geoms = [box_in(busy, .1, .7, .3, .9), box_in(busy, .6, .1, .9, .4), box_in(quiet, .4, .4, .6, .6)]
    detections = gpd.GeoDataFrame({"detection_id": ["a", "b", "c"]}, geometry=geoms, crs="EPSG:4326")
    tiles = {"a": chips[busy.path], "b": chips[busy.path], "c": chips[quiet.path]}
    report = detection_quicklooks(detections, ["accept", "reject", "needs_review"], tiles, tmp_path, max_tiles=1)
    assert report["tiles"] == 1 and report["written"] == [str(tmp_path / f"{Path(busy.path).stem}.png")]
    panel = np.asarray(Image.open(report["written"][0]))
    original = np.moveaxis(chips[busy.path].rgb8(), 0, -1)
    changed = (panel != original).any(axis=-1)
    rows, cols = np.nonzero(changed)
    height, width = changed.shape
    top_left = (rows < height / 2) & (cols < width / 2)  # north-west box: accepted
    assert (panel[rows[top_left], cols[top_left]] == DECISION_COLOURS["accept"]).all() and top_left.sum() > 20
    assert (panel[rows[~top_left], cols[~top_left]] == DECISION_COLOURS["reject"]).all() and (~top_left).sum() > 20
    assert not changed[height // 4 - 2:height // 4 + 2, width // 4 - 2:width // 4 + 2].any()  # outlines, not fills

"""Quicklook pictures of real training_data chips and the flywheel summary plot."""

from __future__ import annotations

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
    table = [{"round": 1, "val_iou": 0.77, "held_out_pixel_iou": 0.87, "held_out_object_f1": 0.6, "accepted": 442,
              "rejected": 749, "needs_review": 12},
             {"round": 2, "val_iou": None, "held_out_pixel_iou": 0.85, "held_out_object_f1": 0.4, "accepted": 6,
              "rejected": 19, "needs_review": 0}]
    figure = flywheel_summary_figure(table)
    scores, counts = figure.axes
    assert [line.get_ydata()[1] for line in scores.lines][1:] == [0.85, 0.4]
    assert np.isnan(scores.lines[0].get_ydata()[1])
    assert sum(patch.get_height() for patch in counts.patches) == 442 + 749 + 12 + 6 + 19
    figure.savefig(tmp_path / "plot.png")
    assert Image.open(tmp_path / "plot.png").size == (900, 360)

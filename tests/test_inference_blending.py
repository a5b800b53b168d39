"""Tiled inference with overlap blending equals whole-image inference (no seams), on a real Austin tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aegir.dataflows import inference
from aegir.dataflows.vhr_loaders import named_tile_chip

from conftest import SHARED_DATA

AUSTIN = SHARED_DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"


def _conv_model() -> torch.nn.Module:
    """A fixed random fully-convolutional net (receptive field 9 px, zero padding: edge effects like a U-Net's)."""
    torch.manual_seed(0)
    layers = []
    for channels_in, channels_out in ((3, 8), (8, 8), (8, 8), (8, 1)):
        layers += [torch.nn.Conv2d(channels_in, channels_out, 3, padding=1), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1], torch.nn.Sigmoid()).eval()


def _predict(model):
    def predict_tiles(tiles: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(tiles.astype(np.float32) / 255.0))[:, 0].numpy()

    return predict_tiles


@pytest.fixture(scope="module")
def austin_image() -> np.ndarray:
    return named_tile_chip(str(sorted(AUSTIN.glob("*.png"))[0])).pixels  # (3, 640, 640) real aerial tile


def test_blended_tiles_equal_whole_image_at_tile_borders(austin_image):
    predict = _predict(_conv_model())
    whole = predict(austin_image[None])[0]
    tiled = inference.blended_probabilities(austin_image, predict, tile_px=256, overlap_px=64)
    assert tiled.shape == whole.shape == (640, 640)
    edges = [192, 256, 384, 448]  # tiles start at 0, 192, 384 (stride 192, last flush) and are 256 px wide
    difference = np.abs(tiled - whole)
    assert difference[:, [e - 1 for e in edges] + edges].max() < 1e-3
    assert difference[[e - 1 for e in edges] + edges, :].max() < 1e-3
    assert np.abs(tiled - whole).max() < 1e-3


def test_crop_and_paste_without_overlap_shows_seams(austin_image):
    """The same model tiled with no overlap differs from whole-image inference at the tile borders."""
    predict = _predict(_conv_model())
    whole = predict(austin_image[None])[0]
    naive = inference.blended_probabilities(austin_image, predict, tile_px=256, overlap_px=0)
    assert np.abs(naive - whole)[:, 255:257].max() > 1e-2


def test_small_images_and_bad_overlap():
    image = np.random.default_rng(0).integers(0, 255, (3, 100, 70), dtype=np.uint8)
    probabilities = inference.blended_probabilities(image, lambda t: np.full(t.shape[:1] + t.shape[2:], 0.25), 256, 64)
    assert probabilities.shape == (100, 70) and np.allclose(probabilities, 0.25)
    with pytest.raises(ValueError, match="overlap_px"):
        inference.blended_probabilities(image, lambda t: t[:, 0], 64, 64)
    assert inference.pv_mask(np.array([[0.2, 0.5, 0.9]]), 0.5).tolist() == [[0, 1, 1]]

"""The one tiled predictor (:mod:`aegir.training.predictor`): batched tiles blended with raised-cosine weights equal
whole-image inference (no seams) on a real Austin tile, for a batch callable and for a trained-model object."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aegir.training.predictor import blended_probabilities
from aegir.store.rasters import named_tile_chip

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
    tiled = blended_probabilities(austin_image, predict, tile_px=256, overlap_px=64)
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
    naive = blended_probabilities(austin_image, predict, tile_px=256, overlap_px=0)
    assert np.abs(naive - whole)[:, 255:257].max() > 1e-2


def test_small_images_and_bad_overlap():
    image = np.random.default_rng(0).integers(0, 255, (3, 100, 70), dtype=np.uint8)
    probabilities = blended_probabilities(image, lambda t: np.full(t.shape[:1] + t.shape[2:], 0.25), 256, 64)
    assert probabilities.shape == (100, 70) and np.allclose(probabilities, 0.25)
    with pytest.raises(ValueError, match="overlap_px"):
        blended_probabilities(image, lambda t: t[:, 0], 64, 64)


def test_batches_and_model_objects_give_the_same_blend(austin_image):
    """Batch size does not change the blend; a model with only ``predict_proba`` is tiled the same way."""
    predict = _predict(_conv_model())
    sizes: list[int] = []

    def counting(tiles: np.ndarray) -> np.ndarray:
        sizes.append(len(tiles))
        return predict(tiles)

    class PerTile:
        def predict_proba(self, tile: np.ndarray) -> np.ndarray:
            return predict(tile[None])[0]

    batched = blended_probabilities(austin_image, counting, tile_px=256, overlap_px=64, batch_size=4)
    assert sizes == [4, 4, 1]  # 3 × 3 tiles
    one_by_one = blended_probabilities(austin_image, predict, tile_px=256, overlap_px=64, batch_size=1)
    per_tile = blended_probabilities(austin_image, PerTile(), tile_px=256, overlap_px=64, batch_size=3)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    np.testing.assert_allclose(batched, per_tile, atol=1e-6)


def test_valid_mask_skips_empty_tiles_and_keeps_the_blend(austin_image):
    predict = _predict(_conv_model())
    valid = np.zeros(austin_image.shape[1:], bool)
    valid[:200, :200] = True  # only the top-left tile and its neighbours hold valid pixels
    shapes: list[tuple] = []

    def recording(tiles: np.ndarray) -> np.ndarray:
        shapes.append(tiles.shape)
        return predict(tiles)

    full = blended_probabilities(austin_image, predict, tile_px=256, overlap_px=64)
    masked = blended_probabilities(austin_image, recording, tile_px=256, overlap_px=64, valid=valid)
    assert sum(s[0] for s in shapes) == 4  # tiles at rows / cols 0 and 192
    assert np.array_equal(masked[valid], full[valid]) and not masked[~valid].any()


def test_axes_shorter_than_a_tile_are_not_padded():
    """An image smaller than ``tile_px`` along an axis is one tile of its own length there (no padding)."""
    rng = np.random.default_rng(1)
    shapes: list[tuple] = []

    def recording(tiles: np.ndarray) -> np.ndarray:
        shapes.append(tiles.shape)
        return tiles.mean(axis=1) / 255.0

    for height, width, expected in ((100, 70, [(1, 3, 100, 70)]), (100, 300, [(2, 3, 100, 256)])):
        image = rng.integers(0, 255, (3, height, width), dtype=np.uint8)
        shapes.clear()
        probabilities = blended_probabilities(image, recording, tile_px=256, overlap_px=64)
        assert shapes == expected
        np.testing.assert_allclose(probabilities, image.mean(axis=0) / 255.0, atol=1e-6)


def test_segmentation_model_predicts_through_the_tiled_predictor(austin_image):
    """``SegmentationModel.predict_proba``: one network pass up to its tile size, the blended tiles beyond."""
    import aegir.training  # noqa: F401  (torchvision shim before smp)
    from aegir.training.config import TrainConfig
    from aegir.training.litmodule import SegmentationLitModule, SegmentationModel, checkpoint_payload

    torch.manual_seed(0)
    module = SegmentationLitModule(TrainConfig(encoder="resnet18"), {"mean": [110.0] * 3, "std": [50.0] * 3})
    payload = checkpoint_payload(module, 0, "memory://", None, {}, 0)
    image = austin_image[:, :300, :250]
    whole = SegmentationModel(payload, tile=1024)
    with torch.no_grad():  # one pass over the image reflect-padded to the network stride (32 px)
        padded = torch.nn.functional.pad(torch.from_numpy(image).float()[None], (0, 6, 0, 20), mode="reflect")
        expected = torch.sigmoid(whole.net(padded))[0, 0, :300, :250].numpy()
    np.testing.assert_allclose(whole.predict_proba(image), expected, atol=1e-5)
    tiled = SegmentationModel(payload, tile=256, overlap=64, batch_size=2)
    np.testing.assert_allclose(tiled.predict_proba(image),
                               blended_probabilities(image, tiled.predict_batch, 256, 64, 4), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tiled.predict_proba(image[:2])


def test_tta_averages_the_dihedral_views_mapped_back(austin_image):
    """D4 test-time augmentation: a per-pixel model is unchanged by it; a convolutional one (zero padding, so not
    rotation-equivariant) gets the mean of its eight views, each rotated / flipped back onto the tile."""
    from aegir.training.predictor import D4_VIEWS, _unview, _view, tta_predictor

    tiles = np.stack([austin_image[:, :256, :256], austin_image[:, 256:512, 100:356]])
    dark = lambda batch: np.where(batch.mean(axis=1) < 60, 0.9, 0.05).astype(np.float32)  # noqa: E731
    assert np.array_equal(tta_predictor(dark)(tiles), dark(tiles))
    predict = _predict(_conv_model())
    expected = np.mean([_unview(predict(np.ascontiguousarray(_view(tiles, code))), code) for code in D4_VIEWS], axis=0)
    averaged = tta_predictor(predict)(tiles)
    assert averaged.shape == (2, 256, 256) and np.allclose(averaged, expected, atol=1e-6)
    assert np.abs(averaged - predict(tiles)).max() > 1e-3  # the views disagree: TTA changes the answer
    assert tta_predictor(predict, (0,)) is predict

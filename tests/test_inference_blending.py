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
    from aegir.training.inference_model import SegmentationModel
    from aegir.training.litmodule import SegmentationLitModule, checkpoint_payload

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


def test_margins_leave_tile_edges_out_and_still_sum_to_one():
    """``margin_px``: weights ~0 within the margin of an inner tile edge, a raised-cosine ramp after it, and two
    tiles overlapping by exactly ``overlap_px`` sum to 1; the default margin keeps a 64 px ramp."""
    from aegir.training.predictor import _axis_weights, checked_margin_px, default_margin_px

    first, second = _axis_weights(0, 512, 2000, 224, 80), _axis_weights(288, 512, 2000, 224, 80)
    band = slice(288, 512)  # the overlap, in the first tile's coordinates
    np.testing.assert_allclose(first[band] + second[:224], 1.0, atol=2e-6)
    assert first[-80:].max() < 1e-5 and second[80:224 - 80].min() > 0 and second[:80].max() < 1e-5
    assert default_margin_px(224) == 80 and default_margin_px(64) == 0 and checked_margin_px(224, None) == 80
    for overlap, margin in ((224, 112), (64, -1), (0, 8)):
        with pytest.raises(ValueError, match="margin_px must lie in"):
            checked_margin_px(overlap, margin)


def _per_image_model(net: torch.nn.Module, **options):
    """A :class:`SegmentationModel` with per-image normalisation whose network is ``net`` (logits)."""
    import aegir.training  # noqa: F401  (torchvision shim before smp)
    from aegir.training.config import TrainConfig
    from aegir.training.inference_model import SegmentationModel
    from aegir.training.litmodule import SegmentationLitModule, checkpoint_payload

    module = SegmentationLitModule(TrainConfig(encoder="resnet18", normalization="per_image"),
                                   {"mean": [110.0] * 3, "std": [50.0] * 3})
    model = SegmentationModel(checkpoint_payload(module, 0, "memory://", None, {}, 0), **options)
    model.net.net = net
    return model


def test_per_image_models_are_tiled_with_the_image_statistics(austin_image):
    """A per-image-normalised model sees every tile of an image standardised by the image's own statistics
    (over its valid pixels), so tiled == whole-image inference; per-tile statistics would leave seams."""
    logits = torch.nn.Sequential(*list(_conv_model())[:-1])  # the short-context conv net, logits out
    model = _per_image_model(logits, tile=256, overlap=64)
    whole = model.predict_standardized(model.standardized(austin_image)[None])[0]
    tiled = model.predict_proba(austin_image)
    assert np.abs(tiled - whole).max() < 1e-4
    per_tile = blended_probabilities(austin_image, model.predict_batch, 256, 64)
    assert np.abs(per_tile - whole).max() > 10 * max(np.abs(tiled - whole).max(), 1e-4)
    valid = np.zeros(austin_image.shape[1:], bool)
    valid[:, :320] = True  # statistics of the valid half only
    standardized = model.standardized(austin_image, valid)
    assert np.allclose(standardized[:, valid].mean(axis=1), 0, atol=1e-4)
    assert np.allclose(standardized[:, valid].std(axis=1, ddof=1), 1, atol=1e-3)


def test_autocast_precision_and_channels_last_on_cpu(austin_image):
    """bf16 autocast and NHWC weights give the fp32 probabilities (bf16 within its precision); an unknown
    precision is a clear error."""
    from aegir.training.inference_model import inference_precision

    torch.manual_seed(0)
    net = torch.nn.Sequential(*list(_conv_model())[:-1])
    tiles = np.stack([austin_image[:, :256, :256], austin_image[:, 256:512, :256]])
    fp32_model = _per_image_model(net, precision="fp32")
    tiles = np.stack([fp32_model.standardized(tile) for tile in tiles])
    fp32 = fp32_model.predict_standardized(tiles)
    nhwc = _per_image_model(net, precision="fp32", channels_last=True).predict_standardized(tiles)
    bf16 = _per_image_model(net, precision="bf16").predict_standardized(tiles)
    assert bf16.dtype == np.float32 and np.abs(nhwc - fp32).max() < 1e-5
    assert 0 < np.abs(bf16 - fp32).max() < 0.05
    assert inference_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        inference_precision("int8", torch.device("cpu"))

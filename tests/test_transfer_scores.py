"""Transfer scores against box annotations: the real NREL sample tiles + hand-built boundary cases."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from aegir.dataflows.transfer_scores import box_detection_scores
from aegir.store.mask_files import MaskFileError, read_box_annotations, read_image_chip
from conftest import SHARED_DATA

NREL = SHARED_DATA / "vhr" / "nrel_panel_segmentation" / "sample_data_set"
IMAGES = NREL / "images"
ANNOTATIONS = NREL / "annotations.csv"


def _burn(boxes: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool with every box filled (corners rounded, max exclusive)."""
    mask = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in np.rint(boxes).astype(int):
        mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


@pytest.fixture(scope="module")
def nrel():
    """(image paths, boxes by stem, burnt masks by stem) of the 13 NREL sample tiles."""
    if not ANNOTATIONS.is_file():
        pytest.fail(f"{ANNOTATIONS} is missing from the shared data")
    paths = sorted(IMAGES.glob("*.png"))
    boxes = read_box_annotations(ANNOTATIONS)
    burnt = {}
    for path in paths:
        with Image.open(path) as image:
            burnt[path.stem] = _burn(boxes.get(path.stem, np.zeros((0, 4))), (image.height, image.width))
    return paths, boxes, burnt


def test_read_box_annotations_matches_the_csv(nrel):
    _, boxes, _ = nrel
    frame = pd.read_csv(ANNOTATIONS)
    assert sum(len(b) for b in boxes.values()) == len(frame) == 62
    assert set(boxes) == {f.removesuffix(".png") for f in frame["filename"]}
    first = frame[frame["filename"] == "1698.png"][["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
    np.testing.assert_array_equal(boxes["1698"], first)


def test_read_box_annotations_names_the_file_on_missing_columns(tmp_path):
    bad = tmp_path / "boxes.csv"
    bad.write_text("filename,xmin,ymin\n1.png,1,2\n")
    with pytest.raises(ValueError, match=r"boxes\.csv.*\['xmax', 'ymax'\]"):
        read_box_annotations(bad)
    assert issubclass(MaskFileError, ValueError)


def _expected_burnt_counts(burnt: dict[str, np.ndarray]) -> int:
    from scipy import ndimage as ndi

    total = 0
    for mask in burnt.values():
        labels, n = ndi.label(mask, structure=np.ones((3, 3)))
        total += int((np.bincount(labels.ravel())[1:] >= 50).sum())
    return total


def test_burnt_annotation_boxes_score_perfectly(nrel):
    paths, boxes, burnt = nrel
    scores = box_detection_scores(burnt, boxes)
    assert len(paths) == 13 and len(scores["per_image"]) == 13
    assert scores["boxes"] == len(pd.read_csv(ANNOTATIONS)) == 62
    assert scores["found"] == scores["boxes"] and scores["recall"] == 1.0
    assert scores["components"] == scores["correct"] == _expected_burnt_counts(burnt) > 0
    assert scores["precision"] == 1.0 and scores["f1"] == 1.0
    assert all(s["boxes"] == len(boxes[stem]) for stem, s in scores["per_image"].items())


def test_empty_prediction_scores_zero(nrel):
    _, boxes, burnt = nrel
    scores = box_detection_scores({stem: np.zeros_like(m) for stem, m in burnt.items()}, boxes)
    assert scores["boxes"] == 62 and scores["found"] == 0 and scores["recall"] == 0.0
    assert scores["components"] == 0 and scores["correct"] == 0 and scores["precision"] == 0.0
    assert scores["f1"] == 0.0


# ---- hand-built boundary cases -------------------------------------------------------------------------------

BOX_10 = np.array([[10.0, 10.0, 20.0, 20.0]])  # rows / columns 10..19: 100 px


@pytest.mark.parametrize("covered, found", [(24, 0), (25, 1), (26, 1)])
def test_cover_boundary(covered, found):
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, 10:20].flat[:covered] = True  # row-major fill inside the box
    assert mask.sum() == covered
    scores = box_detection_scores({"a": mask}, {"a": BOX_10})
    assert scores["found"] == found and scores["boxes"] == 1


@pytest.mark.parametrize("size, counted", [(49, 0), (50, 1)])
def test_component_size_boundary(size, counted):
    mask = np.zeros((40, 40), dtype=bool)
    mask[12:17, 12:22].flat[:size] = True  # 5 × 10 block (50 px), touching the box
    scores = box_detection_scores({"a": mask}, {"a": BOX_10})
    assert scores["components"] == scores["correct"] == counted


@pytest.mark.parametrize("first_column, correct", [(19, 1), (20, 0), (21, 0)])
def test_touching_means_sharing_a_pixel(first_column, correct):
    """Box columns are 10..19 (xmax 20 exclusive): a component from column 19 shares pixels, from 20 it is only
    adjacent, from 21 one pixel apart."""
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:20, first_column:first_column + 6] = True  # 60 px
    scores = box_detection_scores({"a": mask}, {"a": BOX_10})
    assert scores["components"] == 1 and scores["correct"] == correct
    assert scores["precision"] == float(correct)


def test_components_are_8_connected_and_boxless_images_count_for_precision():
    mask = np.zeros((40, 40), dtype=bool)
    mask[0:5, 0:6] = True  # 30 px
    mask[5:10, 6:12] = True  # 30 px, touching the first only diagonally → one 60 px component
    scores = box_detection_scores({"a": mask, "b": mask.copy()}, {"a": np.array([[0.0, 0.0, 2.0, 2.0]])})
    assert scores["per_image"]["a"] == {"boxes": 1, "found": 1, "components": 1, "correct": 1}
    assert scores["per_image"]["b"] == {"boxes": 0, "found": 0, "components": 1, "correct": 0}
    assert scores["precision"] == 0.5 and scores["recall"] == 1.0
    assert scores["f1"] == pytest.approx(2 / 3)


def test_box_rounding_and_clipping():
    mask = np.zeros((20, 20), dtype=bool)
    mask[15:20, 15:20] = True
    boxes = np.array([[14.6, 14.6, 25.0, 25.0],  # → columns / rows 15..19 after rounding and clipping: covered
                      [30.0, 30.0, 40.0, 40.0],  # outside the image: no pixel, never found
                      [5.0, 5.0, 5.0, 9.0]])  # degenerate
    scores = box_detection_scores({"a": mask}, {"a": boxes}, min_component_px=1)
    assert scores["boxes"] == 3 and scores["found"] == 1


# ---- the pipeline with a trivial model --------------------------------------------------------------------------

class BurntBoxModel:
    """Returns, for an image it knows (by its RGB bytes), its annotation boxes as probability 1."""

    def __init__(self, by_digest: dict[str, np.ndarray]):
        self.by_digest = by_digest
        self.calls = 0

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.by_digest[hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()].astype(np.float32)


def test_transfer_box_scores_with_a_trivial_model_reproduces_burnt_scores(nrel):
    from aegir.pipelines.predict import transfer_box_scores

    paths, boxes, burnt = nrel
    by_digest = {hashlib.sha1(read_image_chip(p).rgb8().tobytes()).hexdigest(): burnt[p.stem] for p in paths}
    model = BurntBoxModel(by_digest)
    result = transfer_box_scores(model, IMAGES, ANNOTATIONS, threshold=0.5)
    expected = box_detection_scores(burnt, boxes)
    assert model.calls == 13 and result["images"] == 13 and result["threshold"] == 0.5
    assert result["missing_images"] == [] and result["skipped"] == []
    assert {k: result[k] for k in expected} == expected
    assert result["recall"] == result["precision"] == result["f1"] == 1.0

"""The flywheel's pure parts: the pseudo-label gate (aegir.dataflows.pseudo_labels) on small synthetic arrays with
exact expected values and once with the real offline Mask Factory on real Jiang PV01 tiles, the spatial hold-out
partition (aegir.dataflows.holdout) on the 60 Jiang tiles, the test-time views of the predictor and zoom-out."""

from __future__ import annotations

from collections import Counter
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import JIANG_PV01
from scipy import ndimage as ndi

from aegir.dataflows.holdout import holdout_parts
from aegir.dataflows.pseudo_labels import (
    EVIDENCE,
    PseudoLabelGate,
    candidate_decisions,
    candidate_evidence,
    candidate_labels,
    mean_probability,
    pseudo_windows,
)
from aegir.masks.base import MaskResult
from aegir.pipelines import run_stage
from aegir.store import image_files, mask_files
from aegir.store.lance_io import MASK_IGNORE
from aegir.training.augment import zoom_out
from aegir.training.predictor import view_probabilities
from aegir.utils import geo, s2geometry

STAGE_OUTPUTS = ["candidate_labels", "candidate_evidence", "candidate_decisions", "pseudo_windows"]


class BoxFactory:
    """A Mask Factory stand-in: every box prompt's mask is the box itself (``draw``) or empty."""

    name = "box-stand-in"
    version = "test"
    params: ClassVar[dict] = {}

    def __init__(self, draw: bool = True) -> None:
        self.draw = draw
        self.calls: list[np.ndarray] = []

    def segment(self, image: np.ndarray, prompts) -> MaskResult:
        assert image.ndim == 3 and image.shape[-1] == 3 and image.dtype == np.uint8  # (H, W, 3) RGB as backends take
        self.calls.append(prompts.boxes.copy())
        n = len(prompts)
        masks = np.zeros((n, prompts.height, prompts.width), bool)
        for i in range(n):
            if self.draw:
                masks[i] = prompts.region(i)
        return MaskResult(masks, np.ones(n), np.ones(n))


# ---- a synthetic scene: five candidates and one speck, each failing (at most) one gate -------------------------
#   C1 rectangle 10 × 20 (rows 2:12, cols 2:22)      p 0.9 both views, grey      → accept
#   C2 L-shape in 20 × 20 (rows 20:40, cols 2:22)    p 0.9, area 175             → reject:shape (175 / 400)
#   C3 rectangle 10 × 20 (rows 2:12, cols 30:50)     p 0.9, green (50, 150, 50)  → reject:vegetation
#   C4 rectangle 10 × 20 (rows 20:30, cols 30:50)    view 0: 1.0; view 1: 1.0 on cols 30:38, 0.45 on 38:50
#                                                    → mean 1.0 / 0.725, score 0.835, tta 80 / 200 = 0.4 → reject:tta
#   speck 6 × 6 = 36 px (rows 50:56, cols 60:66)     p 0.9 → no candidate (< min_area_px 40)
#   C6 rectangle 5 × 8 = 40 px (rows 50:55, cols 80:88) p 0.9 → a candidate (exactly min_area_px) → accept
H, W = 64, 96


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((3, H, W), 120, np.uint8)
    image[:, 2:12, 30:50] = np.array([50, 150, 50], np.uint8)[:, None, None]
    views = np.zeros((2, H, W), np.float32)
    views[:, 2:12, 2:22] = 0.9
    views[:, 20:40, 2:7] = 0.9
    views[:, 35:40, 2:22] = 0.9
    views[:, 2:12, 30:50] = 0.9
    views[0, 20:30, 30:50] = 1.0
    views[1, 20:30, 30:38] = 1.0
    views[1, 20:30, 38:50] = 0.45
    views[:, 50:56, 60:66] = 0.9
    views[:, 50:55, 80:88] = 0.9
    return image, views


CORNERS = {"C1": (2, 2), "C2": (20, 2), "C3": (2, 30), "C4": (20, 30), "C6": (50, 80)}


def _gate_run(factory, gate: PseudoLabelGate):
    image, views = _scene()
    mean = mean_probability(views)
    labels = candidate_labels(mean, gate)
    evidence = candidate_evidence(labels, views, mean, image, factory, gate)
    decisions = candidate_decisions(evidence, gate)
    index = {name: int(labels[r, c]) - 1 for name, (r, c) in CORNERS.items()}
    return labels, evidence, decisions, index


def test_candidates_are_components_of_at_least_min_area():
    gate = PseudoLabelGate()
    labels, _, _, index = _gate_run(BoxFactory(), gate)
    assert labels.dtype == np.int32 and labels.max() == 5  # five components; the 36 px speck is none
    assert sorted(index.values()) == [0, 1, 2, 3, 4]
    assert (labels[50:56, 60:66] == 0).all()
    assert (labels[50:55, 80:88] == index["C6"] + 1).all() and (labels == index["C6"] + 1).sum() == 40
    assert (labels == index["C2"] + 1).sum() == 175  # 20 × 5 + 5 × 15


def test_gate_evidence_and_decisions_on_the_synthetic_scene():
    gate = PseudoLabelGate(box_margin_px=0)  # the box prompt is the component's own box
    factory = BoxFactory(draw=True)
    _, evidence, decisions, index = _gate_run(factory, gate)
    assert set(EVIDENCE) <= set(evidence)
    c1, c2, c3, c4, c6 = (index[n] for n in ("C1", "C2", "C3", "C4", "C6"))
    # rectangularity: area / (min rotated rectangle of the pixel centres + 1 px per side)
    assert evidence["rectangularity"][c1] == pytest.approx(1.0)
    assert evidence["rectangularity"][c6] == pytest.approx(1.0)
    assert evidence["rectangularity"][c2] == pytest.approx(175 / 400)
    # excess green 2g − r − b of chromatic coordinates: grey 0, (50, 150, 50) → 2·0.6 − 0.2 − 0.2 = 0.8
    assert evidence["excess_green"][c1] == pytest.approx(0.0, abs=1e-6)
    assert evidence["excess_green"][c3] == pytest.approx(0.8, abs=1e-5)
    # TTA: the views agree on C1; on C4 view 1 keeps 80 of the 200 px above the threshold
    assert evidence["tta_agreement"][c1] == 1.0
    assert evidence["tta_agreement"][c4] == pytest.approx(0.4)
    assert evidence["score"][c4] == pytest.approx((80 * 1.0 + 120 * 0.725) / 200)
    assert evidence["score"][c1] == pytest.approx(0.9)
    assert evidence["area_px"][[c1, c2, c6]].tolist() == [200, 175, 40]
    # the Mask Factory is asked once, only for the cheap-gate survivors (C1, C6), on the crop holding both boxes
    # + 32 px (here the whole 64 × 96 image, so the boxes keep their coordinates)
    assert [call.tolist() for call in factory.calls] == [[[2, 2, 22, 12], [80, 50, 88, 55]]]
    assert evidence["mask_factory_iou"][c1] == 1.0 and evidence["mask_factory_iou"][c6] == 1.0
    assert np.isnan(evidence["mask_factory_iou"][[c2, c3, c4]]).all()
    assert evidence["box"][c1].tolist() == [2, 2, 22, 12]
    by_name = {name: decisions[index[name]] for name in CORNERS}
    assert by_name == {"C1": "accept", "C2": "reject:shape", "C3": "reject:vegetation", "C4": "reject:tta",
                       "C6": "accept"}


def test_an_empty_mask_factory_answer_rejects():
    gate = PseudoLabelGate(box_margin_px=0)
    _, evidence, decisions, index = _gate_run(BoxFactory(draw=False), gate)
    for name in ("C1", "C6"):
        assert evidence["mask_factory_iou"][index[name]] == 0.0
        assert decisions[index[name]] == "reject:mask_factory"


def test_box_prompt_margin_grows_the_box():
    gate = PseudoLabelGate()  # box_margin_px 3: C1's box (2, 2, 22, 12) → (0, 0, 25, 15), clipped at the image edge
    _, evidence, decisions, index = _gate_run(BoxFactory(draw=True), gate)
    c1, c6 = index["C1"], index["C6"]
    assert evidence["box"][c1].tolist() == [0, 0, 25, 15]
    assert evidence["mask_factory_iou"][c1] == pytest.approx(200 / (25 * 15))
    # a box-filling answer around a 40 px component: 40 / (11 × 14) < 0.5 → rejected
    assert evidence["mask_factory_iou"][c6] == pytest.approx(40 / (11 * 14))
    assert decisions[c6] == "reject:mask_factory"


def test_the_stage_dag_gives_the_same_answer():
    image, views = _scene()
    gate = PseudoLabelGate(box_margin_px=0)
    found = run_stage("pseudo_labels", STAGE_OUTPUTS, {"image": image, "view_probabilities": views,
                                                       "mask_factory": BoxFactory(), "gate": gate, "window_px": 64})
    labels, _, decisions, _ = _gate_run(BoxFactory(), gate)
    assert np.array_equal(found["candidate_labels"], labels)
    assert found["candidate_decisions"] == decisions
    # 64² windows over 64 × 96: origins (0, 0) and (32, 0); both hold an accepted component (C1 / C6) → positive,
    # the rejected candidates and the p ≥ 0.2 pixels ignored, the rest background
    windows = found["pseudo_windows"]
    assert [(w.col, w.row, w.kind) for w in windows] == [(0, 0, "positive"), (32, 0, "positive")]
    accepted = np.isin(labels, [k + 1 for k, d in enumerate(decisions) if d == "accept"])
    expected = np.where(accepted, 1, np.where(views.max(axis=0) < 0.2, 0, MASK_IGNORE)).astype(np.uint8)
    for window in windows:
        assert np.array_equal(window.mask, expected[:, window.col:window.col + 64])


# ---- pseudo_windows -------------------------------------------------------------------------------------------


def test_pseudo_windows_positive_negative_and_left_out():
    """256 × 512 image, 128² windows at cols 0 / 128 / 256 / 384 and rows 0 / 128."""
    gate = PseudoLabelGate()
    labels = np.zeros((256, 512), np.int32)
    labels[10:30, 10:40] = 1  # window (0, 0): accepted …
    labels[60:80, 60:90] = 2  # … and rejected → positive, the rejected one ignored
    labels[20:40, 150:190] = 3  # window (128, 0): accepted only → positive
    decisions = ["accept", "reject:shape", "accept"]
    evidence = {"score": np.array([0.9, 0.8, 0.95])}
    views = np.full((2, 256, 512), 0.1, np.float32)
    views[:, labels > 0] = 0.9
    views[1, 5:7, 300:302] = 0.15  # window (256, 0): all < 0.2 → negative, confidence 1 − 0.15
    views[:, 10:50, 400:450] = 0.3  # window (384, 0): 12 % uncertain, no candidate → neither
    views[:, 200:202, 10:20] = 0.3  # window (0, 128): 20 px = 0.12 % uncertain (≤ 2 %) → still a negative
    windows = pseudo_windows(labels, decisions, evidence, views, 128, gate)
    by_origin = {(w.col, w.row): w for w in windows}
    assert (384, 0) not in by_origin
    mixed = by_origin[(0, 0)]
    assert mixed.kind == "positive" and mixed.components == 1 and mixed.confidence == pytest.approx(0.9)
    assert (mixed.mask[10:30, 10:40] == 1).all() and (mixed.mask[60:80, 60:90] == MASK_IGNORE).all()
    assert (mixed.mask == 1).sum() == 600 and (mixed.mask == MASK_IGNORE).sum() == 600
    positive = by_origin[(128, 0)]
    assert positive.kind == "positive" and positive.size == 128 and positive.components == 1
    assert positive.confidence == pytest.approx(0.95)
    expected = np.zeros((128, 128), np.uint8)
    expected[20:40, 22:62] = 1
    assert positive.mask.dtype == np.uint8 and np.array_equal(positive.mask, expected)
    negative = by_origin[(256, 0)]
    assert negative.kind == "negative" and negative.components == 0 and not negative.mask.any()
    assert negative.confidence == pytest.approx(0.85)
    uncertain = by_origin[(0, 128)]
    assert uncertain.kind == "negative" and (uncertain.mask == MASK_IGNORE).sum() == 20
    # the bottom row is 0.1 but for those 20 px → four negatives at confidence 0.9 (0.7 with the uncertain pixels)
    assert [(w.col, w.row, w.kind) for w in windows] == [(0, 0, "positive"), (128, 0, "positive"),
                                                         (256, 0, "negative")] + [
        (c, 128, "negative") for c in (0, 128, 256, 384)]
    assert [w.confidence for w in windows[3:]] == pytest.approx([0.7, 0.9, 0.9, 0.9])


# ---- the real offline Mask Factory on real tiles ------------------------------------------------------------

# tiles with the most PV arrays (30 and 22 components ≥ 40 px); measured: 30 of 30 and 20 of 22 accepted
# (2 × reject:mask_factory; GrabCut IoU of the accepted ones ≥ 0.55), deterministic across runs
JIANG_TILES = ("PV01_325190_1204161.bmp", "PV01_325188_1204161.bmp")


def test_true_masks_pass_the_gate_with_the_offline_backend():
    from aegir.masks import get_backend

    backend = get_backend("offline")
    accepted = total = 0
    admitted = {}
    for name in JIANG_TILES:
        image = mask_files.read_image_chip(JIANG_PV01 / "images" / name).rgb8()
        truth = image_files.read_mask(JIANG_PV01 / "masks" / name).astype(bool)
        views = np.stack([truth, truth]).astype(np.float32)  # a perfect model: 1 inside the truth, 0 outside
        found = run_stage("pseudo_labels", STAGE_OUTPUTS, {"image": image, "view_probabilities": views,
                                                           "mask_factory": backend, "gate": PseudoLabelGate(),
                                                           "window_px": 256})
        labels, decisions = found["candidate_labels"], found["candidate_decisions"]
        truth_labels, _ = ndi.label(truth, structure=np.ones((3, 3)))
        big = np.bincount(truth_labels.ravel())[1:] >= 40
        assert len(decisions) == int(big.sum())  # the candidates are the true arrays of ≥ 40 px
        for k, decision in enumerate(decisions):
            if decision == "accept":
                assert truth[labels == k + 1].all()  # every accepted component lies on the truth
        accepted += decisions.count("accept")
        total += len(decisions)
        admitted[name] = found["pseudo_windows"]
    assert total == 52 and accepted / total >= 0.8  # measured 50 / 52
    first = admitted[JIANG_TILES[0]]
    assert len(first) == 1 and first[0].kind == "positive"  # one 256² window per tile, holding accepted arrays
    truth = image_files.read_mask(JIANG_PV01 / "masks" / JIANG_TILES[0]).astype(bool)
    kept, _ = ndi.label(truth, structure=np.ones((3, 3)))
    sizes = np.bincount(kept.ravel())
    assert np.array_equal(first[0].mask == 1, (sizes[kept] >= 40) & truth)  # every array accepted (measured)
    assert np.array_equal(first[0].mask == MASK_IGNORE, (sizes[kept] < 40) & truth)  # specks: no opinion


# ---- the hold-out partition -------------------------------------------------------------------------------------

SHARES = {"target": 0.3334, "test": 0.3333}  # the shipped defaults
LEVEL = 16


@pytest.fixture(scope="module")
def jiang_centres() -> np.ndarray:
    paths = image_files.list_image_files(JIANG_PV01 / "images")
    assert len(paths) == 60
    return np.array([geo.chip_centre_lonlat(mask_files.read_image_chip(p)) for p in paths])


def test_holdout_parts_are_whole_cells_close_to_the_shares(jiang_centres):
    tokens = s2geometry.s2_tokens(jiang_centres[:, 1], jiang_centres[:, 0], LEVEL).tolist()
    biggest_cell = max(Counter(tokens).values())  # 9 of 60 tiles in one level-16 cell (26 cells)
    for salt in ("0", "1", "2", "flywheel"):
        parts = holdout_parts(jiang_centres, LEVEL, SHARES, salt)
        assert set(parts) == {"labelled", "target", "test"}
        cells = {name: {t for t, p in zip(tokens, parts) if p == name} for name in set(parts)}
        assert not (cells["labelled"] & cells["target"] or cells["labelled"] & cells["test"]
                    or cells["target"] & cells["test"])
        sizes = Counter(parts)
        targets = {"target": 0.3334 * 60, "test": 0.3333 * 60, "labelled": 60 * (1 - 0.6667)}
        # greedy whole-cell assignment (largest cells first, each to the part missing most), so each part ends
        # within one (largest) cell of its target; measured: 20 / 20 / 20 for salts "0".."3"
        for name, want in targets.items():
            assert abs(sizes[name] - want) <= biggest_cell, (salt, sizes)


def test_holdout_parts_depend_on_the_salt_only(jiang_centres):
    first = holdout_parts(jiang_centres, LEVEL, SHARES, "0")
    assert holdout_parts(jiang_centres, LEVEL, SHARES, "0") == first
    assert holdout_parts(jiang_centres[::-1].copy(), LEVEL, SHARES, "0") == first[::-1]  # not on the order
    others = [holdout_parts(jiang_centres, LEVEL, SHARES, salt) for salt in ("1", "2", "3")]
    assert all(other != first for other in others)


def test_holdout_without_shares_is_all_labelled(jiang_centres):
    assert set(holdout_parts(jiang_centres, LEVEL, {"target": 0.0, "test": 0.0}, "0")) == {"labelled"}


# ---- test-time views ------------------------------------------------------------------------------------------


def _landing(code: int, r: np.ndarray, c: np.ndarray, height: int, width: int):
    """Where original pixel (r, c) lands in dihedral view ``code`` (k = code % 4 counter-clockwise quarter
    turns, then a left-right flip if code ≥ 4), and the view's width — written out case by case."""
    table = {
        0: (r, c, width), 1: (width - 1 - c, r, height), 2: (height - 1 - r, width - 1 - c, width),
        3: (c, height - 1 - r, height), 4: (r, width - 1 - c, width), 5: (width - 1 - c, height - 1 - r, height),
        6: (height - 1 - r, c, width), 7: (c, r, height),
    }
    return table[code]


def test_view_probabilities_maps_every_view_back():
    height, width = 5, 7  # not square: a wrong turn changes the shape
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, height, width)).astype(np.uint8)
    codes = tuple(range(8))

    def pixelwise(chip: np.ndarray) -> np.ndarray:  # equivariant: every view maps back to the same map
        return chip[0].astype(np.float32) / 255

    out = view_probabilities(image, pixelwise, codes)
    assert out.shape == (8, height, width) and out.dtype == np.float32
    assert all(np.array_equal(view, image[0] / np.float32(255)) for view in out)

    def column(chip: np.ndarray) -> np.ndarray:  # not rotation-invariant: the column index / width of its input
        h, w = chip.shape[-2:]
        return np.broadcast_to(np.arange(w, dtype=np.float32) / w, (h, w))

    out = view_probabilities(image, column, codes)
    r, c = np.mgrid[:height, :width]
    for code in codes:
        _, landed_col, view_width = _landing(code, r, c, height, width)
        assert np.allclose(out[code], landed_col / view_width), code
    # the transpose (code 7): the column function of the view is the row function of the original grid
    assert np.allclose(out[7], r / height)


# ---- zoom-out ---------------------------------------------------------------------------------------------------


def _blocky_sample() -> tuple[torch.Tensor, torch.Tensor]:
    """A 128 × 96 image of 16 px blocks on/off in band 0 and the mask = band 0 > 127."""
    rng = np.random.default_rng(0)
    band = np.kron(rng.random((8, 6)) > 0.5, np.ones((16, 16))).astype(np.float32) * 255
    image = torch.tensor(np.stack([band, 255 - band, np.full_like(band, 100)]))
    return image, torch.tensor((band > 127).astype(np.uint8))


@pytest.mark.parametrize("factor", [1.0, 0.5, 0.9, 0.71, 0.37, 0.33])
def test_zoom_out_keeps_shapes_and_aligned_binary_masks(factor):
    image, mask = _blocky_sample()
    torch.manual_seed(3)
    zoomed, zoomed_mask = zoom_out(image, mask, factor)
    assert zoomed.shape == image.shape and zoomed.dtype == torch.float32
    assert zoomed_mask.shape == mask.shape and zoomed_mask.dtype == torch.uint8
    assert set(torch.unique(zoomed_mask).tolist()) <= {0, 1}
    thresholded = (zoomed[0] > 127.5).numpy()
    disagree = thresholded != zoomed_mask.numpy().astype(bool)
    if factor in (1.0, 0.5):  # identity, and 2 × 2 area means of 16 px blocks: exact
        assert not disagree.any()
        return
    # elsewhere the area-resampled image and the nearest-resampled mask may differ only on the pixels that
    # straddle a block edge: every disagreeing pixel lies within 1 px of an edge of the thresholded image, and
    # at most 10 % of the chip (measured: 8.7 % at 0.33, 4.1 % at 0.37, 3.8 % at 0.71, 2.7 % at 0.9)
    edges = thresholded ^ ndi.binary_erosion(thresholded, np.ones((3, 3)), border_value=1)
    edges |= ~thresholded & ndi.binary_dilation(thresholded, np.ones((3, 3)))
    near_edge = ndi.binary_dilation(edges, np.ones((3, 3)))
    assert not (disagree & ~near_edge).any()
    assert disagree.mean() <= 0.10

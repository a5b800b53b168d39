"""The flywheel's detect step (see :mod:`aegir.pipelines.flywheel_steps` for the others): the round's model under
test-time views over every target image → candidates, their evidence and the gate's decisions
(``round_<k>/detect/detections.parquet``), the admitted windows (``windows.json`` + ``masks.npz``) for the next
round, what changed on the unlabelled region since the previous round, and quicklooks.

Scoring only: on target images with truth, the share of accepted candidates that lie on true PV
(``accepted_precision``) is measured after the gate has decided; no decision reads it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from aegir.pipelines.flywheel_steps import RoundContext, target_image_paths, target_truth
from aegir.store import image_files, run_files

def step_detect(context: RoundContext) -> dict:
    """Test-time views of the round's model over every target image → gated candidates and admitted windows."""
    from aegir.dataflows.pseudo_labels import PseudoLabelGate
    from aegir.masks import get_backend
    from aegir.pipelines import run_stage
    from aegir.pipelines.predict import load_rgb_model
    from aegir.store import mask_files
    from aegir.training.predictor import view_probabilities

    cfg = context.config
    gate = PseudoLabelGate(**cfg.gate)
    model = load_rgb_model(context.earlier("train")["checkpoint"], "cpu")
    backend = get_backend(cfg.mask_factory)
    out = run_files.ensure_dir(context.round_dir / "detect")
    truth = target_truth(context)
    rows, windows, masks, looks, skipped, on_truth = [], [], {}, [], [], []
    for path in target_image_paths(context):
        try:
            chip = mask_files.read_image_chip(path)
        except (ValueError, OSError) as exc:
            skipped.append({"file": str(path), "reason": str(exc)})
            continue
        image = chip.rgb8()
        views = view_probabilities(image, model.predict_proba, tuple(cfg.tta_views))
        found = run_stage("pseudo_labels", ["candidate_labels", "candidate_evidence", "candidate_decisions",
                                            "pseudo_windows"],
                          {"image": image, "view_probabilities": views, "mask_factory": backend, "gate": gate,
                           "window_px": cfg.window_px})
        rows += _detection_rows(chip, path, found)
        for window in found["pseudo_windows"]:
            key = f"w{len(windows)}"
            masks[key] = window.mask
            windows.append({"key": key, "image": str(path), "col": window.col, "row": window.row,
                            "size": window.size, "kind": window.kind, "confidence": window.confidence,
                            "components": window.components,
                            "evidence": _window_evidence(found, window)})
        looks.append((len(found["candidate_decisions"]), chip, found))
        if path.stem in truth:  # scoring only, after the gate has decided
            on_truth += accepted_on_truth(found, image_files.read_mask(truth[path.stem]) > 0)
    detections = _detections_frame(rows)
    run_files.write_geoparquet(detections, out / "detections.parquet")
    windows_path = run_files.write_json(windows, out / "windows.json")
    masks_path = run_files.write_npz(masks, out / "masks.npz")
    decisions = Counter(d.split(":")[0] for d in detections["decision"]) if len(detections) else Counter()
    reasons = Counter(d for d in detections["decision"] if d != "accept") if len(detections) else Counter()
    result = {"images": len(looks), "skipped": skipped, "detections": int(len(detections)),
              "accepted": decisions.get("accept", 0), "rejected": decisions.get("reject", 0),
              "reject_reasons": dict(reasons), "windows": str(windows_path), "masks": str(masks_path),
              "admitted_positive": sum(w["kind"] == "positive" for w in windows),
              "admitted_negative": sum(w["kind"] == "negative" for w in windows),
              "detections_file": str(out / "detections.parquet"),
              "accepted_on_truth": len(on_truth),
              "accepted_precision": float(np.mean(on_truth)) if on_truth else None}
    result["changes"] = _changes(context, detections)
    result["quicklooks"] = _quicklooks(context, looks)
    return result


def accepted_on_truth(found: dict, truth: np.ndarray, min_cover: float = 0.5) -> list[bool]:
    """Per accepted candidate of one image: whether at least ``min_cover`` of its pixels are PV in ``truth``
    ((H, W) bool on the image grid)."""
    labels = found["candidate_labels"]
    if labels.shape != truth.shape:
        return []
    count = len(found["candidate_decisions"])
    pixels = np.bincount(labels.ravel(), minlength=count + 1)
    on_pv = np.bincount(labels.ravel(), weights=truth.ravel(), minlength=count + 1)
    return [bool(on_pv[k + 1] >= min_cover * pixels[k + 1])
            for k, decision in enumerate(found["candidate_decisions"]) if decision == "accept"]


def _window_evidence(found: dict, window) -> dict:
    """Mean evidence of the accepted components inside a positive window (empty for negatives)."""
    from aegir.dataflows.pseudo_labels import EVIDENCE

    if window.kind != "positive":
        return {}
    labels = found["candidate_labels"][window.row:window.row + window.size, window.col:window.col + window.size]
    ids = np.unique(labels[labels > 0]) - 1
    evidence = found["candidate_evidence"]
    return {name: round(float(np.nanmean(evidence[name][ids])), 4) for name in EVIDENCE}


def _detection_rows(chip, path: Path, found: dict) -> list[dict]:
    """One row per candidate: image, component id, decision, evidence, outline (EPSG:4326)."""
    from aegir.dataflows.pseudo_labels import EVIDENCE
    from aegir.utils import geo

    values, geometries = geo.label_polygons(found["candidate_labels"], chip.transform, chip.crs)
    outlines = dict(zip(values.tolist(), geometries))
    rows = []
    for k, decision in enumerate(found["candidate_decisions"]):
        evidence = {name: float(found["candidate_evidence"][name][k]) for name in EVIDENCE}
        rows.append({"detection_id": f"{path.stem}:{k + 1}", "image": str(path), "component": k + 1,
                     "decision": decision, **evidence, "geometry": outlines.get(k + 1)})
    return rows


def _detections_frame(rows: list[dict]):
    import geopandas as gpd

    if not rows:
        return gpd.GeoDataFrame({"detection_id": [], "image": [], "decision": []}, geometry=[], crs="EPSG:4326")
    return gpd.GeoDataFrame(rows, geometry="geometry", crs="EPSG:4326")


def round_detections(context: RoundContext, round_index: int):
    """The detections (GeoDataFrame, EPSG:4326) a round's detect step wrote."""
    return run_files.read_geoparquet(Path(context.earlier("detect", round_index)["detections_file"]))


def _changes(context: RoundContext, detections) -> dict | None:
    """On the target images without truth (the unlabelled region): the accepted share of the candidates and, from
    round 1, the accepted detections vs the previous round's: kept (one-to-one match at IoU ≥ 0.5), added,
    dropped."""
    from aegir.dataflows.validation import object_level_scores

    def region(frame):
        truth = set(target_truth(context))
        return frame[[Path(p).stem not in truth for p in frame["image"]]] if len(frame) else frame

    def accepted_of(frame):
        return frame[frame["decision"] == "accept"] if len(frame) else frame

    candidates = region(detections)
    accepted = accepted_of(candidates)
    share = float(len(accepted) / len(candidates)) if len(candidates) else 0.0
    if context.round_index == 0:
        return {"region_candidates": int(len(candidates)), "accepted_share": share}
    before = accepted_of(region(round_detections(context, context.round_index - 1)))
    scores = object_level_scores(list(accepted.geometry), list(before.geometry))
    kept = int(scores["matched"])
    return {"region_candidates": int(len(candidates)), "accepted_share": share, "kept": kept,
            "added": int(len(accepted)) - kept, "dropped": int(len(before)) - kept}


def _quicklooks(context: RoundContext, looks: list[tuple]) -> str | None:
    """``round_<k>/quicklooks/detections/``: the target images with the most candidates, each candidate outlined
    by its decision (accept green, reject red), and a contact sheet."""
    from aegir.pipelines.quicklook import candidate_quicklooks

    chosen = sorted(looks, key=lambda item: -item[0])[: context.config.quicklook_images]
    if not chosen:
        return None
    panels = [(Path(chip.source).stem, chip, found["candidate_labels"], found["candidate_decisions"])
              for _, chip, found in chosen]
    return candidate_quicklooks(panels, context.round_dir / "quicklooks" / "detections")["contact_sheet"]

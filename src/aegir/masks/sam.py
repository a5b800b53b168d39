"""SAM-family backends: ``sam`` and ``sam-hq`` (segment-geospatial SamGeo / SamGeo HQ, local checkpoint file) and
``sam2`` (segment-geospatial SamGeo2 → Hugging Face ``from_pretrained`` from a pre-populated local cache).

No weights can be downloaded on these machines, so nothing here downloads: a missing checkpoint or cache entry
raises :class:`~aegir.masks.base.MaskBackendError` naming the file and how to get it. All three wrap a predictor
with SAM's prompt API; :class:`SamPredictorBackend` does the plumbing for any of them: one ``set_image`` (one
image-encoder pass) per image, then every box prompt in one batched decoder call and every point prompt in
another. ``confidence`` is the model's predicted IoU, ``stability`` SAM's stability score (IoU of the mask
thresholded at logit +1 and -1).

segment-geospatial's own modules import torchvision (via timm), so :mod:`aegir.compat.torchvision_nms` is
imported first.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from aegir.masks.base import MaskBackendError, MaskResult
from aegir.masks.prompts import PixelPrompts

SAM_CHECKPOINTS = {  # model type → (file name, official URL)
    "vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "vit_l": ("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
}
SAM_HQ_CHECKPOINTS = {
    "vit_h": ("sam_hq_vit_h.pth", "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_h.pth"),
    "vit_l": ("sam_hq_vit_l.pth", "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_l.pth"),
    "vit_b": ("sam_hq_vit_b.pth", "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_b.pth"),
    "vit_tiny": ("sam_hq_vit_tiny.pth", "https://huggingface.co/lkeab/hq-sam/resolve/main/sam_hq_vit_tiny.pth"),
}
STABILITY_OFFSET = 1.0


def _import_torch_stack() -> None:
    import aegir.compat.torchvision_nms  # noqa: F401  (before anything importing torchvision)


class SamPredictorBackend:
    """Prompt plumbing around a predictor with SAM's API (``set_image``, ``predict_torch`` or SAM2's ``_predict``).

    ``predictor``: ``segment_anything.SamPredictor``, ``segment_anything_hq.SamPredictor`` or
    ``sam2.sam2_image_predictor.SAM2ImagePredictor``. ``trained`` says whether real weights were loaded (False for
    the untrained models the tests build); it is recorded in ``params``.
    """

    def __init__(self, predictor: Any, name: str, version: str, trained: bool, params: dict | None = None) -> None:
        self.predictor = predictor
        self.name = name
        self._version = version
        self._params = {**(params or {}), "trained_weights": trained}
        self.encoder_passes = 0

    @property
    def version(self) -> str:
        return self._version

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    def segment(self, image: np.ndarray, prompts: PixelPrompts) -> MaskResult:
        import torch

        height, width = image.shape[:2]
        n = len(prompts)
        if n == 0:
            return MaskResult.empty(height, width)
        masks = np.zeros((n, height, width), bool)
        confidence, stability = np.zeros(n), np.zeros(n)
        self.predictor.set_image(np.ascontiguousarray(image))
        self.encoder_passes += 1
        is_box = prompts.is_box
        with torch.inference_mode():
            for selection, kwargs in (
                (np.flatnonzero(is_box), lambda idx: {"boxes": prompts.boxes[idx]}),
                (np.flatnonzero(~is_box), lambda idx: {"points": prompts.points[idx]}),
            ):
                if len(selection) == 0:
                    continue
                logits, iou = self._decode(height, width, **kwargs(selection))
                masks[selection] = logits > 0.0
                confidence[selection] = np.clip(iou, 0.0, 1.0)
                high = (logits > STABILITY_OFFSET).sum(axis=(1, 2))
                low = (logits > -STABILITY_OFFSET).sum(axis=(1, 2))
                stability[selection] = np.where(low > 0, high / np.maximum(low, 1), 0.0)
        return MaskResult(masks, confidence, stability)

    def _decode(self, height: int, width: int, boxes: np.ndarray | None = None,
                points: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(logits (B, H, W), predicted IoU (B,)) for a batch of boxes or of single positive points."""
        import torch

        predictor = self.predictor
        if hasattr(predictor, "_predict"):  # SAM2ImagePredictor: coordinates in pixels, normalised inside
            coords = labels = box_t = None
            if boxes is not None:
                box_t = predictor._transforms.transform_boxes(
                    torch.as_tensor(boxes, dtype=torch.float32, device=predictor.device), normalize=True,
                    orig_hw=predictor._orig_hw[-1])
            else:
                coords = predictor._transforms.transform_coords(
                    torch.as_tensor(points[:, None, :], dtype=torch.float32, device=predictor.device),
                    normalize=True, orig_hw=predictor._orig_hw[-1])
                labels = torch.ones(coords.shape[:2], dtype=torch.int, device=predictor.device)
            logits, iou, _ = predictor._predict(coords, labels, box_t, None, multimask_output=False,
                                                return_logits=True)
        else:
            device = predictor.device
            coords = labels = box_t = None
            if boxes is not None:
                box_t = predictor.transform.apply_boxes_torch(
                    torch.as_tensor(boxes, dtype=torch.float32, device=device), (height, width))
            else:
                coords = predictor.transform.apply_coords_torch(
                    torch.as_tensor(points[:, None, :], dtype=torch.float32, device=device), (height, width))
                labels = torch.ones(coords.shape[:2], dtype=torch.int, device=device)
            logits, iou, _ = predictor.predict_torch(coords, labels, box_t, multimask_output=False,
                                                     return_logits=True)
        return logits[:, 0].float().cpu().numpy(), iou[:, 0].float().cpu().numpy()


def _checkpoint(checkpoint: str | os.PathLike | None, table: dict, model_type: str, backend: str,
                env: str) -> Path:
    if model_type not in table:
        raise MaskBackendError(f"{backend}: unknown model type {model_type!r}; one of {', '.join(table)}")
    filename, url = table[model_type]
    path = Path(checkpoint or os.environ.get(env, "") or Path("data") / "weights" / filename)
    if not path.is_file():
        raise MaskBackendError(
            f"{backend} backend needs the {model_type} checkpoint file {filename} at {path} (not found). "
            f"No weights ship with any package and these machines cannot download them: fetch {url} on a machine "
            f"with internet, copy it to {path} (or pass --checkpoint PATH / set {env})."
        )
    return path


def sam_backend(checkpoint: str | None = None, model_type: str = "vit_h", device: str = "cpu") -> SamPredictorBackend:
    """SAM via segment-geospatial ``SamGeo(model_type, automatic=False, checkpoint=...)`` (local file only)."""
    path = _checkpoint(checkpoint, SAM_CHECKPOINTS, model_type, "sam", "AEGIR_SAM_CHECKPOINT")
    _import_torch_stack()
    from samgeo import SamGeo

    model = SamGeo(model_type=model_type, automatic=False, device=device, checkpoint=str(path))
    return SamPredictorBackend(model.predictor, "sam", f"segment-anything {model_type} ({path.name})", True,
                               {"model_type": model_type, "checkpoint": str(path)})


def sam_hq_backend(checkpoint: str | None = None, model_type: str = "vit_h",
                   device: str = "cpu") -> SamPredictorBackend:
    """HQ-SAM via segment-geospatial ``samgeo.hq_sam.SamGeo`` (local file only)."""
    path = _checkpoint(checkpoint, SAM_HQ_CHECKPOINTS, model_type, "sam-hq", "AEGIR_SAM_HQ_CHECKPOINT")
    _import_torch_stack()
    from samgeo.hq_sam import SamGeo as SamGeoHQ

    model = SamGeoHQ(model_type=model_type, automatic=False, device=device, checkpoint=str(path))
    return SamPredictorBackend(model.predictor, "sam-hq", f"segment-anything-hq {model_type} ({path.name})", True,
                               {"model_type": model_type, "checkpoint": str(path)})


# Checkpoint file of each SAM2 model id on the Hugging Face hub (as in Meta's sam2/build_sam.py), so the
# missing-weights message can name the file even where the sam2 package itself is not installed.
SAM2_CHECKPOINTS = {
    f"facebook/{version}-hiera-{size}": f"{version}_hiera_{size.replace('-', '_')}.pt"
    for version in ("sam2", "sam2.1")
    for size in ("tiny", "small", "base-plus", "large")
}


def sam2_cache_entry(model_id: str) -> tuple[str, str]:
    """(Hugging Face repo id, checkpoint file name) SAM2 ``from_pretrained`` loads for ``model_id``."""
    repo = model_id if model_id.startswith("facebook/") else f"facebook/{model_id}"
    if repo not in SAM2_CHECKPOINTS:
        raise MaskBackendError(f"sam2: unknown model id {model_id!r}; one of "
                               f"{', '.join(k.split('/')[1] for k in SAM2_CHECKPOINTS)}")
    return repo, SAM2_CHECKPOINTS[repo]


def sam2_backend(model_id: str = "sam2-hiera-tiny", device: str = "cpu") -> SamPredictorBackend:
    """SAM2 via segment-geospatial ``SamGeo2(model_id, automatic=False)``, offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = sam2_cache_entry(model_id)
    cached = try_to_load_from_cache(repo, filename)
    if not isinstance(cached, str):
        from huggingface_hub.constants import HF_HUB_CACHE

        raise MaskBackendError(
            f"sam2 backend needs {filename} of the Hugging Face repo {repo} in the local hub cache {HF_HUB_CACHE} "
            f"(not found; these machines cannot download it). On a machine with internet run "
            f"`huggingface-cli download {repo} {filename}` (or `hf download {repo} {filename}`) and copy the "
            f"cache folder models--{repo.replace('/', '--')} to {HF_HUB_CACHE} (or set HF_HUB_CACHE)."
        )
    os.environ["HF_HUB_OFFLINE"] = "1"
    _import_torch_stack()
    if importlib.util.find_spec("sam2") is None:
        raise MaskBackendError(
            "sam2 backend needs Meta's `sam2` package: pip install 'git+https://github.com/facebookresearch/sam2' "
            "(the `sam2` on PyPI is a third-party upload and is not used)"
        )
    from samgeo import SamGeo2

    model = SamGeo2(model_id=repo.split("/")[1], automatic=False, device=device)
    return SamPredictorBackend(model.predictor, "sam2", f"sam2 {repo} ({filename})", True,
                               {"model_id": repo, "checkpoint": cached})

"""Pretrained encoder weights by name (``encoder_weights = "imagenet"``) the way segmentation_models_pytorch fetches
them, without any network access.

smp 0.6 downloads named encoder weights with ``huggingface_hub.hf_hub_download`` (``config.json`` +
``model.safetensors`` of ``smp-hub/<encoder>.<weights>`` at a pinned commit) into the Hugging Face cache
``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``): ``models--smp-hub--<encoder>.<weights>/snapshots/<commit>/<file>``.
Each test points HF_HOME / HF_HUB_CACHE / TORCH_HOME at a tmp folder and sets HF_HUB_OFFLINE=1 (huggingface_hub
reads these env variables once, at import, so the matching ``huggingface_hub.constants`` are patched too). Offline
mode makes a missing file fail at once instead of after ~30 s of retries; a cached file at a pinned commit is
returned before any request in either mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aegir.compat import torchvision_nms  # noqa: F401  (before torchvision / timm / smp)
from aegir.store import training_files
from aegir.training.config import TrainConfig
from aegir.training.litmodule import build_network


@pytest.fixture()
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _smp_snapshot(cache: Path, encoder: str, weights: str) -> Path:
    """The folder hf_hub_download fills for smp's ``pretrained_settings[weights]`` of ``encoder``."""
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"][weights]
    repo_dir = "models--" + settings["repo_id"].replace("/", "--")
    return cache / repo_dir / "snapshots" / settings["revision"]


def _seeded_resnet18_state(seed: int = 7) -> dict[str, torch.Tensor]:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    encoder = smp.encoders.get_encoder("resnet18", in_channels=3, weights=None)
    return {k: v.clone().contiguous() for k, v in encoder.state_dict().items()}


def _write_smp_cache(cache: Path, state: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    snapshot = _smp_snapshot(cache, "resnet18", "imagenet")
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(
        {"input_space": "RGB", "input_range": [0, 1], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}))
    save_file(state, str(snapshot / "model.safetensors"))
    return snapshot


def test_named_weights_load_from_the_hf_cache(hf_cache: Path) -> None:
    state = _seeded_resnet18_state()
    _write_smp_cache(hf_cache, state)
    net = build_network("unet", "resnet18", 3, "imagenet")
    loaded = net.encoder.state_dict()
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer4.1.bn2.weight"):
        assert torch.equal(loaded[key], state[key]), key
    assert loaded.keys() == state.keys()
    # more bands: the first conv adapted the smp way (channels cycled, scaled by 3 / in_channels)
    net4 = build_network("unet", "resnet18", 4, "imagenet")
    conv = net4.encoder.state_dict()["conv1.weight"]
    expected = state["conv1.weight"][:, [0, 1, 2, 0]] * (3 / 4)
    assert conv.shape[1] == 4 and torch.allclose(conv, expected)
    assert torch.equal(net4.encoder.state_dict()["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])


def test_missing_cache_names_the_path(hf_cache: Path) -> None:
    snapshot = _smp_snapshot(hf_cache, "resnet18", "imagenet")
    with pytest.raises(ValueError) as info:
        build_network("unet", "resnet18", 3, "imagenet")
    message = str(info.value)
    assert "resnet18" in message and "imagenet" in message
    assert str(snapshot / "model.safetensors") in message and "hf download smp-hub/resnet18.imagenet" in message
    with pytest.raises(ValueError, match="available"):
        build_network("unet", "resnet18", 3, "no-such-weights")


def test_local_weights_file_still_works(hf_cache: Path, tmp_path: Path) -> None:
    state = _seeded_resnet18_state(seed=11)
    path = tmp_path / "encoder.pth"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in state.items()}}, path)
    assert training_files.is_encoder_weights_path(str(path)) and not training_files.is_encoder_weights_path("imagenet")
    net = build_network("unet", "resnet18", 3, str(path))
    for key in ("conv1.weight", "layer3.1.conv2.weight"):
        assert torch.equal(net.encoder.state_dict()[key], state[key])
    with pytest.raises(FileNotFoundError):
        build_network("unet", "resnet18", 3, str(tmp_path / "missing.pth"))


def test_config_accepts_named_weights() -> None:
    assert TrainConfig(encoder_weights="imagenet").encoder_weights == "imagenet"
    assert TrainConfig.from_dict(TrainConfig(encoder_weights="imagenet").to_dict()).encoder_weights == "imagenet"

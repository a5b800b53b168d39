"""Training run files: the run folder, ``split.json``, the W&B folder, weights-only checkpoints (``best.ckpt`` /
``last.ckpt``), local encoder weights, file digests, and the pinned ``training_data`` version a run reads.

Checkpoints hold only tensors and plain str/int/float/bool/None/list/dict (``format`` = :data:`CHECKPOINT_FORMAT`,
written by :class:`aegir.training.litmodule.BestCheckpoint`), so they are read with ``torch.load(weights_only=True)``
(no arbitrary pickle). torch is imported lazily.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

CHECKPOINT_FORMAT = "aegir-segmentation/1"
SPLIT_FILE = "split.json"
WANDB_DIR = "wandb"


def run_dir(out_dir: str | Path) -> Path:
    """The training run folder ``out_dir``, created."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_split_json(out_dir: str | Path, text: str) -> Path:
    """``OUT/split.json`` holding ``text`` (the split's JSON)."""
    path = run_dir(out_dir) / SPLIT_FILE
    path.write_text(text)
    return path


def wandb_dir(out_dir: str | Path) -> Path:
    """``OUT/wandb``, created (W&B's offline run files land there)."""
    path = Path(out_dir) / WANDB_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def pinned_training_dataset(dataset_uri: str | None, lancedb_root: str, version: int | None = None):
    """(lance dataset of the ``training_data`` table at ``version`` (the current one when None), its uri):
    the fixed table version a training run or an export reads."""
    import lance

    from aegir.store import lance_io

    table = lance_io.open_training_table(dataset_uri, lancedb_root, create=False)
    uri = table.to_lance().uri
    return lance.dataset(uri, version=version or int(table.version)), uri


def write_checkpoint(payload: dict[str, Any], path: str | Path) -> Path:
    """``torch.save`` of a checkpoint payload, written to a temporary name in the same folder then renamed."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def checkpoint_exists(path: str | Path) -> bool:
    """Whether a checkpoint file exists at ``path``."""
    return Path(path).is_file()


def read_checkpoint(checkpoint_path: str | Path) -> dict[str, Any]:
    """The checkpoint payload, read with ``weights_only=True``; FileNotFoundError when missing, ValueError when the
    file is not an aegir segmentation checkpoint."""
    import torch

    path = Path(checkpoint_path)
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint_path}: no such checkpoint")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{checkpoint_path}: not an aegir segmentation checkpoint ({CHECKPOINT_FORMAT})")
    return payload


def read_encoder_weights(weights: str | Path) -> dict[str, Any]:
    """The tensors of a local encoder weights file (a state dict, or a dict holding one under ``state_dict``,
    or a ``.safetensors`` file), read weights-only; nothing is downloaded."""
    import torch

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights {weights}: no such file")
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


_WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors")


def is_encoder_weights_path(weights: str | Path) -> bool:
    """Whether ``encoder_weights`` names a local file (a path separator, a weights-file suffix, or an existing
    file) rather than pretrained weights by name (``"imagenet"``, ``"ssl"``, a timm tag, ...)."""
    text = str(weights)
    return isinstance(weights, Path) or "/" in text or "\\" in text or \
        Path(text).suffix.lower() in _WEIGHT_FILE_SUFFIXES or Path(text).is_file()


def _named_weights_cache(encoder: str, weights: str) -> tuple[str, list[tuple[str, bool]], str]:
    """(what is fetched, [(cache file the library reads offline, whether it is there)], how to put them there) for
    named weights, the
    way segmentation_models_pytorch 0.6 fetches them: smp encoders ``hf_hub_download`` ``config.json`` and
    ``model.safetensors`` of ``smp-hub/<encoder>.<weights>`` at a pinned commit into the Hugging Face cache;
    ``tu-`` encoders go through timm (Hugging Face ``timm/<model>.<tag>``, else a torch.hub URL)."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    def hf_files(repo_id: str, revision: str, filenames: list[str]) -> tuple[str, list[tuple[str, bool]], str]:
        repo_dir = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
        snapshot = repo_dir / "snapshots" / (revision if revision != "main" else "<commit in refs/main>")
        files = [(str(snapshot / name), isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str))
                 for name in filenames]
        rev = "" if revision != "main" else f" (and {repo_dir / 'refs' / 'main'} holding the snapshot's commit hash)"
        how = (f"on a machine online run `hf download {repo_id} {' '.join(filenames)}"
               f"{'' if revision == 'main' else ' --revision ' + revision}` (or build the model once there) and copy "
               f"{repo_dir} into {constants.HF_HUB_CACHE} here{rev}; the cache root follows HF_HUB_CACHE / HF_HOME")
        return f"{repo_id}@{revision}", files, how

    if encoder.startswith("tu-"):
        import timm

        name = encoder[3:] if weights == "imagenet" else f"{encoder[3:]}.{weights}"
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except RuntimeError:  # an unknown pretrained tag
            cfg = None
        if cfg is None:
            return name, [], ""
        if cfg.hf_hub_id:
            repo_id, _, revision = cfg.hf_hub_id.partition("@")
            return hf_files(repo_id, revision or "main", [cfg.hf_hub_filename or "model.safetensors"])
        if cfg.url:
            import torch

            path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
            return cfg.url, [(str(path), path.is_file())], f"download {cfg.url} to {path} (the cache root follows TORCH_HOME)"
        return name, [], ""
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders[encoder]["pretrained_settings"][weights]
    return hf_files(settings["repo_id"], settings["revision"], ["config.json", "model.safetensors"])


def resolve_encoder_weights(encoder: str, weights: str | Path, in_channels: int = 3, depth: int = 5,
                            output_stride: int = 32) -> dict[str, Any]:
    """The encoder state dict for ``encoder_weights``: a local file (:func:`read_encoder_weights`, as stored), or
    weights by name fetched by segmentation_models_pytorch itself (``smp.encoders.get_encoder(weights=...)``: the
    Hugging Face download when online, its cache file when offline; first conv adapted to ``in_channels`` the smp
    way), returned for an encoder of that ``in_channels`` / ``depth``. ``tu-`` (timm) encoders take ``"imagenet"``
    (timm's default pretrained tag, or the tag in the encoder name) or a timm tag (``tu-resnet18`` +
    ``"a1_in1k"``). Raises ValueError for unknown names and when the download fails with no cache file,
    naming the cache path."""
    if is_encoder_weights_path(weights):
        return read_encoder_weights(weights)
    weights = str(weights)
    from aegir.compat import torchvision_nms  # noqa: F401, I001  (before torchvision / timm / smp)
    import segmentation_models_pytorch as smp

    if encoder.startswith("timm-") and encoder not in smp.encoders.encoders:
        raise ValueError(f"encoder_weights {weights!r}: use the tu- name of the deprecated encoder {encoder}")
    if encoder.startswith("tu-"):
        what, files, how = _named_weights_cache(encoder, weights)
        if not files and not how:
            import timm

            tags = [n.partition(".")[2] for n in timm.list_pretrained(encoder[3:].partition(".")[0] + ".*")]
            raise ValueError(f"encoder_weights {weights!r}: timm has no pretrained weights {what!r} for {encoder} "
                             f"(tags: {tags}) and no such local file")
        encoder_name, lib_weights = (encoder if weights == "imagenet" else f"{encoder}.{weights}"), True
    else:
        available = smp.encoders.encoders.get(encoder, {}).get("pretrained_settings", {})
        if encoder not in smp.encoders.encoders or weights not in available:
            raise ValueError(f"encoder_weights {weights!r}: not a pretrained weight name of encoder {encoder} "
                             f"(available: {sorted(available)}) and no such local file")
        what, files, how = _named_weights_cache(encoder, weights)
        encoder_name, lib_weights = encoder, weights
    try:
        net = smp.encoders.get_encoder(encoder_name, in_channels=in_channels, depth=depth, weights=lib_weights,
                                       output_stride=output_stride)
    except Exception as exc:
        missing = [path for path, cached in files if not cached]
        if not missing:
            raise
        raise ValueError(f"encoder_weights {weights!r} for encoder {encoder}: could not download {what} ({exc}) "
                         f"and the cache file is missing: {', '.join(missing)}. To train offline, {how} "
                         "(HF_HUB_OFFLINE=1 skips the download retries).") from exc
    return net.state_dict()


def file_digest(path: str | Path, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]

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
    """The tensors of a local encoder weights file (a state dict, or a dict holding one under ``state_dict``),
    read weights-only; nothing is downloaded."""
    import torch

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights {weights}: no such file (only local weights are used)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def file_digest(path: str | Path, length: int = 16) -> str:
    """First ``length`` hex digits of the SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]

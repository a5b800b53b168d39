"""LightningDataModule over the LanceDB ``training_data`` table, streamed with ``lance.torch.data``.

* **Rows**: rows with a mask, narrowed by metadata filters (dataset, mask source, provenance backend: SQL built by
  :func:`aegir.store.lance_io.build_where_clause`, values quoted by :mod:`aegir.store.sql`; S2 cell
  (``filter_s2_cell``) and acquisition dates: checked in Python on the scanned metadata, exact for any S2
  level ≤ 17).
* **Splits**: spatially disjoint. Each row's S2 cell at ``split_level`` (the parent of its level-17 token) is
  hashed (sha256 of ``salt:token``) to u ∈ [0, 1): val when u < val_fraction, test when u < val+test, else train.
  A cell never changes split when rows are added. The split, its cells and the table version read are recorded
  (:class:`SplitInfo`, written next to the checkpoint and stored in it).
* **Streaming**: one ``LanceDataset`` per split, pinned to the table version, ``filter = uuid IN (…)``,
  ``shard_granularity="fragment"`` so each DataLoader worker reads its own fragments; workers are spawned
  (Lance is not fork-safe). Chips are decoded by :class:`ChipDecoder` (the ``to_tensor_fn``), training batches go
  through a shuffle buffer and per-sample flips / rot90 applied identically to image and mask, then (VHR, when
  configured) zoom-out, blur and colour jitter (:mod:`aegir.training.augment`). Each sample carries its loss
  weight by mask source (``source_weights``); rows of ``train_only_datasets`` (pseudo-labels) always train.
* **Inputs**: ``vhr`` (the RGB chip, uint8), ``msi`` (Sentinel-2 bands, bilinearly resampled onto the chip grid)
  or ``vhr+msi`` (stacked). Per-band mean / std come from the train split; the model normalises (so a checkpoint
  carries its own statistics and predicts from raw uint8 pixels).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import lightning as L
import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, IterableDataset

from aegir.store import lance_io, sql, training_files
from aegir.training.config import TrainConfig
from aegir.training.augment import radiometric_and_scale
from aegir.training.lance_tensors import decode_chip_column, training_batch_to_tensors
from aegir.utils import s2geometry

SPLITS = ("train", "val", "test")
READ_COLUMNS = ["uuid", "vhr_image_chip", "generated_mask", "truth_mask", "msi_image_chip", "metadata"]


# ---- S2 cells and splits -----------------------------------------------------------------------------------


def cell_fraction(token: str, salt: str = "") -> float:
    """Deterministic u ∈ [0, 1) for an S2 token (first 64 bits of sha256(``salt:token``), or of the token alone)."""
    text = f"{salt}:{token}" if salt else token
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) / 2**64


def split_of_cell(token: str, val_fraction: float, test_fraction: float, salt: str = "") -> str:
    u = cell_fraction(token, salt)
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@dataclass
class SplitInfo:
    """Which rows (uuids) and S2 cells went where, and from which table version."""

    dataset_uri: str
    dataset_version: int
    level: int
    val_fraction: float
    test_fraction: float
    salt: str
    where: str | None
    uuids: dict[str, list[str]] = field(default_factory=dict)
    cells: dict[str, list[str]] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(self.uuids.get(name, [])) for name in SPLITS}

    def summary(self) -> dict[str, Any]:
        """Everything but the uuid lists (for checkpoints and logs)."""
        out = {k: v for k, v in asdict(self).items() if k != "uuids"}
        return out | {"counts": self.counts()}

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"counts": self.counts()}, indent=1)


def _date(text: str, end: bool) -> dt.datetime:
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    if end and len(text) <= 10:  # a bare date is inclusive
        value += dt.timedelta(days=1)
    return value


def _sql_filters(config: TrainConfig) -> dict[str, Any]:
    where: dict[str, Any] = {}
    if config.filter_dataset:
        where["metadata.dataset"] = list(config.filter_dataset)
    if config.filter_mask_source:
        where["metadata.mask_source"] = list(config.filter_mask_source)
    if config.filter_provenance_backend:
        where["metadata.provenance.backend"] = list(config.filter_provenance_backend)
    return where


def select_rows(dataset, config: TrainConfig) -> tuple[pa.Table, str | None]:
    """Metadata of the usable rows (mask present, filters applied) and the SQL part of the filter."""
    clause = lance_io.build_where_clause(_sql_filters(config), dataset.schema)
    where = lance_io.mask_target_filter(config.mask_target) + (f" AND {clause}" if clause else "")
    rows = dataset.to_table(
        columns={"uuid": "uuid", "s2": "metadata.s2_token_l17", "acquired_at": "metadata.acquired_at",
                 "dataset": "metadata.dataset"},
        filter=where,
    )
    keep = np.ones(rows.num_rows, dtype=bool)
    if config.filter_s2_cell:
        token = config.filter_s2_cell.strip().lower()
        level = int(s2geometry.cell_level(s2geometry.token_to_cell_id(np.array([token])))[0])
        if level > sql.S2_TOKEN_MAX_LEVEL:
            raise lance_io.StoreError(f"S2 cell {token!r} is level {level}; rows carry cells down to level "
                                      f"{sql.S2_TOKEN_MAX_LEVEL}")
        keep &= s2geometry.parent_tokens(rows["s2"].to_numpy(zero_copy_only=False), level) == token
    if config.filter_date_from or config.filter_date_to:
        times = rows["acquired_at"].to_pylist()
        lo = _date(config.filter_date_from, False) if config.filter_date_from else None
        hi = _date(config.filter_date_to, True) if config.filter_date_to else None
        keep &= np.array([t is not None and (lo is None or t >= lo) and (hi is None or t < hi) for t in times],
                         dtype=bool)
    return rows.filter(pa.array(keep)), where


def make_splits(dataset, dataset_uri: str, config: TrainConfig) -> SplitInfo:
    """Assign the selected rows of ``dataset`` (a lance dataset at a fixed version) to train / val / test; rows of
    ``config.train_only_datasets`` (e.g. pseudo-labels) always train, and their cells are not listed."""
    rows, where = select_rows(dataset, config)
    info = SplitInfo(dataset_uri, int(dataset.version), config.split_level, config.val_fraction,
                     config.test_fraction, config.split_salt, where, {s: [] for s in SPLITS}, {s: [] for s in SPLITS})
    if rows.num_rows == 0:
        return info
    tokens = rows["s2"].to_numpy(zero_copy_only=False)
    cells = s2geometry.parent_tokens(tokens, config.split_level)
    val_fraction = 0.0 if config.val_cells else config.val_fraction
    assignment = {c: split_of_cell(c, val_fraction, config.test_fraction, config.split_salt)
                  for c in sorted(set(cells.tolist()))}
    splits = [assignment[c] for c in cells.tolist()]
    if config.val_cells:
        splits = _with_val_cells(tokens, cells, splits, config.val_cells)
    train_only = set(config.train_only_datasets)
    for uuid, split, name in zip(rows["uuid"].to_pylist(), splits, rows["dataset"].to_pylist()):
        info.uuids["train" if name in train_only else split].append(uuid)
    listed = {(cell, split) for cell, split, name in zip(cells.tolist(), splits, rows["dataset"].to_pylist())
              if name not in train_only}
    for cell, split in sorted(listed):
        info.cells[split].append(cell)
    return info


def _with_val_cells(tokens: np.ndarray, cells: np.ndarray, splits: list[str], val_cells: list[str]) -> list[str]:
    """``splits`` with every row inside one of ``val_cells`` (S2 tokens of one level) moved to val; cells at
    ``split_level`` are listed under each split they hold rows of."""
    level = int(s2geometry.cell_level(s2geometry.token_to_cell_id(np.array(val_cells[:1])))[0])
    inside = np.isin(s2geometry.parent_tokens(tokens, level), np.array([t.lower() for t in val_cells], dtype=object))
    return ["val" if hit else split for hit, split in zip(inside.tolist(), splits)]


def uuid_filter(uuids: list[str]) -> str:
    """``uuid IN ('…', …)`` (``FALSE`` when empty), quoted by :func:`aegir.store.sql.in_list`."""
    return sql.in_list("uuid", uuids)


# ---- decoding, augmentation --------------------------------------------------------------------------------


def _column(batch, name: str) -> pa.Array:
    array = batch[name]
    return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array


def decode_msi(batch, size: tuple[int, int]) -> torch.Tensor:
    """(B, bands, H, W) float32 MSI chips bilinearly resampled onto the VHR chip grid ``size``."""
    meta = _column(batch, "metadata")
    chips = _column(batch, "msi_image_chip")
    if chips.null_count:
        raise ValueError("inputs include msi but some rows have no msi_image_chip (filter them out)")
    block = decode_chip_column(chips, ["raw"] * len(meta), meta.field("msi_shape").to_pylist(),
                               meta.field("msi_dtype").to_pylist())
    msi = torch.from_numpy(np.nan_to_num(block.astype(np.float32)))
    return torch.nn.functional.interpolate(msi, size=size, mode="bilinear", align_corners=False)


class ChipDecoder:
    """``to_tensor_fn`` of the Lance stream: ``{"image": (B, C, H, W), "mask": (B, H, W) uint8, "weight": (B,)}``.

    ``vhr``: the uint8 RGB chips; ``msi``: float32 Sentinel-2 bands on the chip grid; ``vhr+msi``: both stacked
    as float32. ``weight``: the loss weight of each row's ``metadata.mask_source`` in ``source_weights`` (1 when
    absent). Picklable (spawned workers rebuild it)."""

    def __init__(self, inputs: str = "vhr", mask_target: str = "auto",
                 source_weights: dict[str, float] | None = None) -> None:
        self.inputs = inputs
        self.mask_target = mask_target
        self.source_weights = dict(source_weights or {})

    def __call__(self, batch, **_: Any) -> dict[str, torch.Tensor]:
        out = training_batch_to_tensors(batch, self.mask_target)
        sources = _column(batch, "metadata").field("mask_source").to_pylist()
        out["weight"] = torch.tensor([self.source_weights.get(s or "", 1.0) for s in sources], dtype=torch.float32)
        if self.inputs == "vhr":
            return out
        msi = decode_msi(batch, tuple(out["mask"].shape[-2:]))
        out["image"] = msi if self.inputs == "msi" else torch.cat([out["image"].float(), msi], dim=1)
        return out


def augment_sample(image: torch.Tensor, mask: torch.Tensor, code: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One of the 8 dihedral transforms (``code`` 0..7: k = code % 4 quarter turns, then a flip if code ≥ 4) on
    (C, H, W) image and (H, W) mask alike."""
    k = code % 4
    image, mask = torch.rot90(image, k, dims=(-2, -1)), torch.rot90(mask, k, dims=(-2, -1))
    if code >= 4:
        image, mask = torch.flip(image, dims=(-1,)), torch.flip(mask, dims=(-1,))
    return image, mask


def random_crop(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random ``size``×``size`` window of (C, H, W) image and (H, W) mask (whole sample if smaller)."""
    h, w = mask.shape[-2:]
    if h <= size and w <= size:
        return image, mask
    top, left = int(torch.randint(max(1, h - size + 1), ())), int(torch.randint(max(1, w - size + 1), ()))
    return image[..., top:top + size, left:left + size], mask[..., top:top + size, left:left + size]


class SplitStream(IterableDataset):
    """Batches of one split: Lance batches decoded by :class:`ChipDecoder`, shuffled through a buffer and
    augmented (train), re-batched to ``batch_size``; ``repeats`` passes per epoch."""

    def __init__(self, lance_dataset, batch_size: int, inputs: str, train: bool, augment: bool,
                 shuffle_buffer: int = 256, repeats: int = 1, crop_size: int | None = None,
                 scale_range: list[float] | None = None, color_jitter: float = 0.0, blur_sigma: float = 0.0) -> None:
        self.source = lance_dataset
        self.crop_size = crop_size
        self.scale_range, self.color_jitter, self.blur_sigma = scale_range, color_jitter, blur_sigma
        self.batch_size, self.inputs, self.train, self.augment = batch_size, inputs, train, augment
        self.shuffle_buffer, self.repeats = shuffle_buffer, repeats

    def _samples(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for _ in range(self.repeats):
            for batch in self.source:
                yield from zip(batch["image"], batch["mask"], batch["weight"])

    @property
    def _radiometric(self) -> bool:
        return bool(self.scale_range or self.color_jitter or self.blur_sigma)

    def _shuffled(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        buffer: list = []
        for sample in self._samples():
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(int(torch.randint(len(buffer), ())))
        while buffer:
            yield buffer.pop(int(torch.randint(len(buffer), ())))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        images, masks, weights = [], [], []
        for image, mask, weight in (self._shuffled() if self.train else self._samples()):
            if self.train and self.augment:
                image, mask = augment_sample(image, mask, int(torch.randint(8, ())))
                if self._radiometric and self.inputs == "vhr":
                    image, mask = radiometric_and_scale(image, mask, self.scale_range, self.color_jitter,
                                                        self.blur_sigma)
            if self.train and self.crop_size:
                image, mask = random_crop(image, mask, self.crop_size)
            images.append(image)
            masks.append(mask)
            weights.append(weight)
            if len(images) == self.batch_size:
                yield {"image": torch.stack(images), "mask": torch.stack(masks), "weight": torch.stack(weights)}
                images, masks, weights = [], [], []
        if images:
            yield {"image": torch.stack(images), "mask": torch.stack(masks), "weight": torch.stack(weights)}


# ---- band statistics ---------------------------------------------------------------------------------------


def band_stats(lance_dataset, uuids: list[str], inputs: str, max_rows: int = 2048,
               batch_size: int = 64) -> dict[str, list[float]]:
    """Per-band mean and std (population) over the chips of ``uuids`` (the first ``max_rows`` of them, sorted)."""
    from lance.torch.data import LanceDataset

    chosen = sorted(uuids)[:max_rows]
    if not chosen:
        raise ValueError("no rows to compute band statistics from (the train split is empty)")
    stream = LanceDataset(lance_dataset, batch_size=batch_size, columns=READ_COLUMNS, filter=uuid_filter(chosen),
                          to_tensor_fn=ChipDecoder(inputs))
    total = total_sq = None
    count = 0
    for batch in stream:
        image = batch["image"].double()
        s, sq = image.sum(dim=(0, 2, 3)), (image * image).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        total_sq = sq if total_sq is None else total_sq + sq
        count += image.shape[0] * image.shape[2] * image.shape[3]
    mean = total / count
    std = torch.sqrt(torch.clamp(total_sq / count - mean * mean, min=0.0))
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return {"mean": mean.tolist(), "std": std.tolist()}


# ---- the DataModule ----------------------------------------------------------------------------------------


class LanceSegmentationData(L.LightningDataModule):
    """train / val / test loaders over one pinned version of a ``training_data`` table.

    ``dataset_uri``: a table location as ``aegir dataset build --uri`` takes it (or the ``.lance`` folder).
    After :meth:`setup`: ``split`` (:class:`SplitInfo`), ``stats`` ({"mean", "std"} per input band),
    ``in_channels`` and ``dataset_version``.
    """

    def __init__(self, dataset_uri: str | None, config: TrainConfig | None = None, lancedb_root: str = "data/lancedb") -> None:
        super().__init__()
        self.dataset_uri, self.lancedb_root = dataset_uri, lancedb_root
        self.config = config or TrainConfig()
        self.split: SplitInfo | None = None
        self.stats: dict[str, list[float]] | None = None
        self._dataset = None

    # Lightning calls setup() on every process; everything here is deterministic, so recomputing is harmless.
    def setup(self, stage: str | None = None) -> None:
        if self._dataset is not None:
            return
        self._dataset, uri = training_files.pinned_training_dataset(self.dataset_uri, self.lancedb_root,
                                                                    self.config.dataset_version)
        version = self._dataset.version
        self.split = make_splits(self._dataset, uri, self.config)
        if not self.split.uuids["train"]:
            raise ValueError(f"no training rows in {self.dataset_uri} (version {version}) after filters and split")
        self.stats = band_stats(self._dataset, self.split.uuids["train"], self.config.inputs,
                                self.config.stats_max_rows)

    @property
    def dataset_version(self) -> int:
        return self.split.dataset_version if self.split else -1

    @property
    def in_channels(self) -> int:
        return len(self.stats["mean"]) if self.stats else 0

    def stream(self, split: str, train: bool | None = None) -> SplitStream:
        from lance.torch.data import LanceDataset

        cfg = self.config
        train = split == "train" if train is None else train
        source = LanceDataset(self._dataset, batch_size=cfg.batch_size, columns=READ_COLUMNS,
                              filter=uuid_filter(self.split.uuids[split]),
                              to_tensor_fn=ChipDecoder(cfg.inputs, cfg.mask_target, cfg.source_weights),
                              shard_granularity="fragment")
        return SplitStream(source, cfg.batch_size, cfg.inputs, train=train, augment=cfg.augment and train,
                           shuffle_buffer=cfg.shuffle_buffer, repeats=cfg.epoch_repeats if train else 1,
                           crop_size=cfg.crop_size, scale_range=cfg.scale_range, color_jitter=cfg.color_jitter,
                           blur_sigma=cfg.blur_sigma)

    def _loader(self, split: str) -> DataLoader:
        workers = self.config.num_workers
        options: dict[str, Any] = {"num_workers": workers, "batch_size": None}
        if workers:  # Lance is not fork-safe
            options |= {"multiprocessing_context": "spawn", "persistent_workers": True}
        return DataLoader(self.stream(split), **options)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

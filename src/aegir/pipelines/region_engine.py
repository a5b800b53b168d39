"""The throughput engine of region inference: cells read ahead, model tiles of many cells in one forward pass,
per-cell blends, and batched writes.

* **read ahead** — ``read_workers`` threads build the next cells' mosaics (tile decodes, warps: numpy, PIL and
  GDAL release the GIL) while the model runs; ``read_ahead`` + 1 reads are in flight at most, so memory stays
  bounded by a few cells' windows whatever the region's size.
* **batches across cells** — every cell's model tiles (:class:`aegir.training.predictor.TileBlend`) join one
  queue per tile shape; a forward pass takes ``batch_size`` tiles from it, from as many cells as needed. A cell is
  blended as soon as its last tile is back, with exactly the weights :func:`blended_probabilities` uses (tiled ==
  whole-image inference). When more than ``read_ahead + 2`` cells wait for tiles, the oldest cell's queue goes
  to the model part-full, so no cell waits for ever.
* **outcomes** — each cell ends ``done`` (its probabilities), or with the exception its read or its batch raised
  (the other cells go on); ``KeyboardInterrupt`` and other non-``Exception`` errors propagate.

Pure orchestration: the reads, the model and the post-processing are callables given by the job
(:mod:`aegir.pipelines.region`); nothing here touches a file.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aegir.training.predictor import PredictTiles, TileBlend, predicted_tiles


GPU_BATCH_SIZE = 4  # model tiles per forward pass on a GPU when none is given


def checked_batch_size(batch_size: int | None) -> int | None:
    """``batch_size`` as an int (None stays None: the engine's default); ValueError below 1."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 model tiles per forward pass, got {batch_size}")
    return None if batch_size is None else int(batch_size)


def forward_batch_size(batch_size: int | None, model: Any) -> int:
    """``batch_size`` model tiles per forward pass, or for None :data:`GPU_BATCH_SIZE` when ``model.device`` is a
    GPU and 1 elsewhere: on the CPU, one 1024² tile per pass of the U-Net / ResNet-18 ran 0.279 chips/s against
    0.241 in fours, and its forward needs 0.6 GB instead of 2.0 GB (``bench/inference.py``'s machine)."""
    if (checked := checked_batch_size(batch_size)) is not None:
        return checked
    device = getattr(model, "device", None)
    return GPU_BATCH_SIZE if getattr(device, "type", str(device)) == "cuda" else 1


@dataclass
class CellWork:
    """One cell on its way through the engine: ``read`` is what the reader returned (e.g. mosaic + grid),
    ``image`` / ``valid`` the (C, H, W) pixels and (H, W) mask to predict, ``probabilities`` the blend, ``error``
    the exception of its read or of one of its batches."""

    token: str
    read: Any = None
    image: np.ndarray | None = None
    valid: np.ndarray | None = None
    blend: TileBlend | None = None
    probabilities: np.ndarray | None = None
    error: BaseException | None = None
    waiting: set = field(default_factory=set)  # tile shapes with queued tiles of this cell


def read_ahead(tokens: Iterable[str], read_cell: Callable[[str], CellWork], workers: int,
               ahead: int) -> Iterator[CellWork]:
    """``read_cell(token)`` for every token, in order, up to ``ahead`` + 1 cells in flight on ``workers`` threads
    (0: read inline). A read that raises an ``Exception`` yields the cell with ``error`` set."""
    def safe(token: str) -> CellWork:
        try:
            return read_cell(token)
        except Exception as exc:  # recorded per cell: the region goes on
            return CellWork(token, error=exc)

    if workers <= 0:
        yield from (safe(t) for t in tokens)
        return
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aegir-read") as pool:
        source = iter(tokens)
        for token in source:
            pending.append(pool.submit(safe, token))
            if len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Batcher:
    """Queues of (cell, origin, tile) per tile shape and the forward passes that empty them."""

    def __init__(self, predict_tiles: PredictTiles, batch_size: int) -> None:
        self.predict_tiles, self.batch_size = predict_tiles, max(1, batch_size)
        self.queues: dict[tuple[int, ...], deque] = {}

    def put(self, cell: CellWork) -> None:
        for origin, tile in cell.blend.tiles(cell.image):
            self.queues.setdefault(tile.shape, deque()).append((cell, origin, tile))
            cell.waiting.add(tile.shape)

    def full_shapes(self) -> list[tuple[int, ...]]:
        return [shape for shape, queue in self.queues.items() if len(queue) >= self.batch_size]

    def run(self, shape: tuple[int, ...]) -> None:
        """One forward pass over up to ``batch_size`` queued tiles of ``shape``; a failure fails their cells."""
        queue = self.queues[shape]
        group = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
        live = [(cell, origin, tile) for cell, origin, tile in group if cell.error is None]
        if live:
            try:
                probabilities = predicted_tiles(self.predict_tiles, np.stack([t for _, _, t in live]))
                for (cell, origin, _), probability in zip(live, probabilities):
                    cell.blend.add(origin, probability)
            except Exception as exc:  # the batch's cells fail with the reason; the others go on
                for cell, _, _ in live:
                    cell.error = cell.error or exc
        for cell, _, _ in group:
            if not any(item[0] is cell for item in queue):
                cell.waiting.discard(shape)
        if not queue:
            del self.queues[shape]


def blended_cells(cells: Iterable[CellWork], predict_tiles: PredictTiles, tile_px: int, overlap_px: int,
                  batch_size: int, max_waiting: int, margin_px: int | None = None) -> Iterator[CellWork]:
    """Every cell with ``probabilities`` (or ``error``), in the order they finish; tiles of several cells share
    forward passes of ``batch_size``; at most ``max_waiting`` cells hold queued tiles at a time."""
    batcher = _Batcher(predict_tiles, batch_size)
    waiting: deque[CellWork] = deque()

    def finished() -> Iterator[CellWork]:
        while waiting and not waiting[0].waiting:
            cell = waiting.popleft()
            if cell.error is None:
                cell.probabilities = cell.blend.probabilities()
            cell.image = cell.blend = None  # the window's pixels go as soon as the cell is blended
            yield cell

    for cell in cells:
        if cell.error is not None:
            yield cell
            continue
        cell.blend = TileBlend(cell.image.shape, tile_px, overlap_px, cell.valid, margin_px)
        batcher.put(cell)
        waiting.append(cell)
        for shape in batcher.full_shapes():
            while shape in batcher.queues and len(batcher.queues[shape]) >= batcher.batch_size:
                batcher.run(shape)
        while len(waiting) > max_waiting and waiting[0].waiting:  # the oldest cell waits too long: run part-full
            batcher.run(next(iter(waiting[0].waiting)))
        yield from finished()
    while batcher.queues:
        batcher.run(next(iter(batcher.queues)))
    yield from finished()

"""Scale-out on Ray: the ``training_data`` build and chip inference as Ray Data pipelines over Lance.

Both jobs fan out with ``map_batches`` and fan in with ONE Lance commit on the driver
(:mod:`aegir.store.lance_fragments`: workers write fragments, the driver replaces rows by uuid in one version):

* :func:`build_dataset_ray`: the image list → ``ray.data.from_items`` → :func:`build_block` per block, which builds
  rows with the same Hamilton stage as :func:`aegir.pipelines.dataset.build_dataset_from_images`
  (``training_samples`` → ``training_rows``: same uuid5(dataset:stem) keys, same columns) and writes them as
  fragments of the table.
* :func:`predict_table_ray`: ``ray.data.read_lance`` (uuid, chip, metadata; one pinned table version) →
  :class:`ChipPredictor` (an actor per worker; the checkpoint is loaded once per actor; chips predicted by
  ``SegmentationModel.predict_proba``, i.e. the tiled predictor :mod:`aegir.training.predictor`) → rows of a
  ``predictions`` Lance table (:data:`~aegir.store.lance_fragments.PREDICTIONS_SCHEMA`).

Workers are fresh processes (Ray starts them; nothing forks an open Lance dataset), so Lance's lack of fork
safety does not bite. Every node needs this package installed and the table location reachable (a shared file
system or object storage); see ``docs/scale_out_ray.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from aegir.config import Settings
from aegir.dataflows import chip_predictions
from aegir.pipelines import build_driver, run_stage
from aegir.pipelines.dataset import (
    BUILD_BATCH,
    BuildReport,
    default_dataset_name,
    load_tile_chips,
    msi_chips_for,
)
from aegir.store import lance_fragments, lance_io

RAY_HINT = "scale-out needs Ray: pip install 'aegir-lightning-lance[ray]'"


def _ray():
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - the ray extra is part of dev
        raise RuntimeError(RAY_HINT) from exc
    return ray


@contextmanager
def ray_cluster(address: str | None = None, **init_kwargs: Any) -> Iterator[Any]:
    """The ``ray`` module, connected: reuses an initialised Ray; else ``ray.init(address, **init_kwargs)``
    (``None``: a local cluster; ``"auto"``: the cluster of ``ray start`` on this node; ``"ray://head:10001"``)
    and shuts down on exit only what it started."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    ray.init(address=address, **init_kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def _cluster_cpus(ray: Any) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


# ---- training_data build -----------------------------------------------------------------------------------


def training_rows(chips: list, masks: dict, msi: dict, dataset: str, encoding: str, params: dict,
                  s2_levels: tuple[int, ...], h3_resolution: int) -> pa.Table:
    """``training_data`` rows (validated against the schema of ``s2_levels`` / ``h3_resolution``) from the
    ``training_samples`` stage, as the single-process build makes them."""
    rows = run_stage("training_samples", ["training_rows"], {
        "sample_chips": chips, "sample_masks": {}, "truth_masks": masks, "ignore_masks": {}, "msi_chips": msi, "dataset_name": dataset,
        "chip_encoding": encoding, "mask_source": "ground_truth", "provenance_params": params,
        "s2_levels": s2_levels, "h3_resolution": h3_resolution,
    })["training_rows"]
    return lance_io.validate_rows(rows, lance_io.training_data_schema(s2_levels, h3_resolution))


def build_block(batch: pa.Table, *, dataset_uri: str, masks_by_stem: dict[str, str], dataset: str,
                encoding: str, msi_dir: str | None, params: dict, s2_levels: tuple[int, ...],
                processing_baseline: str | None = None,
                h3_resolution: int) -> pa.Table:
    """Ray ``map_batches`` UDF: the image files of ``batch["path"]`` → rows written as uncommitted fragments.

    Returns one row: ``fragments`` (fragment metadata JSON), ``uuids`` (the rows written), ``skipped`` (JSON list).
    Nothing here imports torchvision, so the worker skips the torchvision shim (and torch's ~2 s import)."""
    skipped: list[dict] = []
    paths = [Path(p) for p in batch.column("path").to_pylist()]
    chips, masks = load_tile_chips(paths, masks_by_stem, skipped)
    msi_chips, msi_skipped = msi_chips_for(chips, msi_dir, processing_baseline)
    fragments, uuids = [], []
    if chips:
        rows = training_rows(chips, masks, msi_chips, dataset, encoding, params, s2_levels, h3_resolution)
        fragments = lance_fragments.write_fragments(rows, dataset_uri)
        uuids = rows.column("uuid").to_pylist()
    return pa.table({"fragments": [fragments], "uuids": [uuids], "skipped": [json.dumps(skipped + msi_skipped)]},
                    schema=pa.schema([("fragments", pa.list_(pa.string())), ("uuids", pa.list_(pa.string())),
                                      ("skipped", pa.string())]))


def _collect(results: list[dict]) -> tuple[list[str], list[str], list[dict]]:
    """(fragments, uuids, skipped sorted by file) of the UDF output rows."""
    fragments = [f for r in results for f in r["fragments"]]
    uuids = [u for r in results for u in r["uuids"]]
    skipped = [s for r in results for s in json.loads(r.get("skipped") or "[]")]
    return fragments, uuids, sorted(skipped, key=lambda s: str(s.get("file")))


def build_dataset_ray(
    settings: Settings,
    images_dir: str | Path,
    masks_dir: str | Path | None = None,
    uri: str | None = None,
    dataset: str | None = None,
    encoding: str = "raw",
    msi_dir: str | None = None,
    num_blocks: int | None = None,
    address: str | None = None,
    processing_baseline: str | None = None,
) -> BuildReport:
    """:func:`aegir.pipelines.dataset.build_dataset_from_images` on Ray: tiles split into ``num_blocks`` blocks
    (default: the cluster's CPUs; at most ``BUILD_BATCH`` tiles a block), rows written by the workers, one commit.

    Re-running replaces the rows of the same uuids (no duplicates). Scalar indexes are refreshed afterwards.
    """
    from aegir.store import image_files

    images = image_files.list_image_files(images_dir)
    masks_by_stem = {stem: str(p) for stem, p in image_files.mask_files_by_stem(masks_dir).items()}
    dataset = dataset or default_dataset_name(images_dir)
    params = {"images_dir": str(Path(images_dir).resolve()), "masks_dir": str(masks_dir) if masks_dir else None}
    with ray_cluster(address) as ray:  # before Lance starts its threads in this process
        table = lance_io.open_training_table(uri, settings.lancedb_root, s2_levels=settings.s2_levels,
                                             h3_resolution=settings.h3_resolution)
        dataset_uri = table.to_lance().uri
        s2_levels, h3_resolution = lance_io.stored_s2_levels(table.schema), lance_io.stored_h3_resolution(table.schema)
        blocks = min(len(images), num_blocks or _cluster_cpus(ray))  # list_image_files: never empty
        per_block = min(BUILD_BATCH, math.ceil(len(images) / blocks))
        kwargs = {"dataset_uri": dataset_uri, "masks_by_stem": masks_by_stem, "dataset": dataset,
                  "encoding": encoding, "msi_dir": msi_dir, "params": params, "s2_levels": s2_levels,
                  "h3_resolution": h3_resolution, "processing_baseline": processing_baseline}
        results = (ray.data.from_items([{"path": str(p)} for p in images], override_num_blocks=blocks)
                   .map_batches(build_block, batch_format="pyarrow", batch_size=per_block, fn_kwargs=kwargs)
                   .take_all())
    fragments, uuids, skipped = _collect(results)
    commit = lance_fragments.commit_fragments(dataset_uri, fragments, uuids)
    table = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    lance_io.ensure_scalar_indexes(table, missing_only=True)
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    return BuildReport(f"{root}/{name}", commit.inserted, commit.updated, table.version, skipped)


# ---- predictions -------------------------------------------------------------------------------------------

PREDICT_COLUMNS = ["uuid", "vhr_image_chip", "metadata"]


class ChipPredictor:
    """Ray ``map_batches`` callable class: the checkpoint is loaded once per actor; each batch of
    ``training_data`` chips → prediction rows written as uncommitted fragments of ``out_dataset_uri``.

    Returns one row per batch: ``fragments`` (metadata JSON) and ``uuids``."""

    def __init__(self, checkpoint: str, out_dataset_uri: str, pv_threshold: float, context: dict[str, Any],
                 device: str | None = None) -> None:
        import aegir.training  # noqa: F401  (torchvision shim before timm / smp import torchvision)
        from aegir.training.inference_model import load_segmentation_model

        self.model = load_segmentation_model(checkpoint, device)
        self.dag = build_driver([chip_predictions])
        self.out_dataset_uri, self.threshold, self.context = out_dataset_uri, pv_threshold, context

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = self.dag.execute(["prediction_rows"], inputs={
            "chip_batch": batch, "predict_proba": self.model.predict_proba, "pv_threshold": self.threshold,
            "prediction_context": self.context})["prediction_rows"]
        fragments = lance_fragments.write_fragments(rows, self.out_dataset_uri)
        return pa.table({"fragments": [fragments], "uuids": [rows.column("uuid").to_pylist()]},
                        schema=pa.schema([("fragments", pa.list_(pa.string())), ("uuids", pa.list_(pa.string()))]))


@dataclass(frozen=True)
class PredictReport:
    """Outcome of :func:`predict_table_ray`: the predictions table, rows new / replaced, its version, and the
    ``training_data`` version that was read."""

    location: str
    inserted: int
    updated: int
    version: int
    source_version: int


def _prediction_context(checkpoint: str, source_uri: str, source_version: int) -> dict[str, Any]:
    import datetime as dt

    from aegir.store.training_files import read_checkpoint

    return {"checkpoint": str(Path(checkpoint).resolve()),
            "model_data_version": int(read_checkpoint(checkpoint)["data_version"]),
            "source_uri": source_uri, "source_version": int(source_version),
            "predicted_at": dt.datetime.now(dt.timezone.utc)}


def predict_table_ray(
    settings: Settings,
    uri: str | None,
    checkpoint: str | Path,
    out_uri: str | None = None,
    pv_threshold: float = 0.5,
    batch_size: int = 16,
    num_workers: int | None = None,
    device: str | None = None,
    address: str | None = None,
    where: str | None = None,
) -> PredictReport:
    """Predict every chip of the ``training_data`` table at ``uri`` with ``checkpoint`` on Ray and upsert one row per
    chip (keyed by the chip's uuid) into the predictions table at ``out_uri`` (default ``predictions`` under the
    LanceDB root) in one commit. ``num_workers`` model actors of one CPU each (default: the cluster's CPUs),
    ``batch_size`` chips per call; ``where``: a Lance SQL filter on the table (e.g.
    ``metadata.dataset = 'jiang_pv01'``) to predict only some chips."""
    with ray_cluster(address) as ray:  # before Lance starts its threads in this process
        source = lance_io.open_training_table(uri, settings.lancedb_root, create=False).to_lance().uri
        version = lance_fragments.dataset_version(source)
        out_dataset_uri = lance_fragments.predictions_dataset_uri(out_uri, settings.lancedb_root)
        context = _prediction_context(str(checkpoint), source, version)
        workers = num_workers or _cluster_cpus(ray)
        results = (lance_fragments.ray_read_lance(source, PREDICT_COLUMNS, version, where)
                   .map_batches(ChipPredictor, batch_format="pyarrow", batch_size=batch_size,
                                compute=ray.data.ActorPoolStrategy(size=workers),
                                fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": device,
                                                       "out_dataset_uri": out_dataset_uri,
                                                       "pv_threshold": pv_threshold, "context": context})
                   .take_all())
    fragments, uuids, _ = _collect(results)
    commit = lance_fragments.commit_fragments(out_dataset_uri, fragments, uuids)
    return PredictReport(out_dataset_uri, commit.inserted, commit.updated, commit.version, version)

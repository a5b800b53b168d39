"""Benchmark: the same 256×256 chips + masks into torch batches from Lance, per-chip GeoTIFFs and Parquet.

Data: the 60 real Jiang PV01 tiles + ground-truth masks, repeated to ``--samples`` chips (default 1,920).
Readers, all yielding {"image": (B,3,256,256) uint8, "mask": (B,256,256) uint8} batches of 32:
  (a) Lance ``training_data`` via ``lance.torch.data.LanceDataset`` + ``training_batch_to_tensors`` (raw and png chips)
  (b) one GeoTIFF per chip and one per mask, read with rasterio in a map-style Dataset (the TorchGeo way)
  (c) one Parquet file with the same raw chip bytes, read by row group
with 0 and 2 DataLoader workers (spawned); then the same readers with shuffled (random) batches, the access
pattern of training with ``shuffle=True``: Lance ``take`` vs Parquet row groups vs GeoTIFF files. Then filtered reads by S2 token: 64 chips out of ≥ 10,000 rows,
with the BTREE scalar index vs without. Goals (issue 3): Lance ≥ 5× (b) and ≥ 1.5× (c).

Run: ``python bench/loader.py [--samples N] [--filter-rows N]``. Prints samples/s and ratios measured in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import rasterio
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from aegir.config import load_settings
from aegir.pipelines.dataset import build_dataset_from_images
from aegir.store import lance_io
from aegir.training.lance_tensors import training_batch_to_tensors

BATCH = 32
COLUMNS = ["vhr_image_chip", "generated_mask", "metadata"]


def _jiang() -> Path:
    return load_settings().sample_data_dir / "vhr" / "jiang_pv01"


def build_lance(root: Path, samples: int, encoding: str) -> tuple[str, pa.Table]:
    """A training_data table of the Jiang tiles repeated to ``samples`` rows (distinct uuids)."""
    settings = load_settings().replace(lancedb_root=str(root))
    uri = str(root / f"jiang_{encoding}")
    build_dataset_from_images(settings, _jiang() / "images", _jiang() / "masks", uri=uri, encoding=encoding)
    table = lance_io.open_training_table(uri, str(root), create=False)
    base = table.to_arrow()
    copies = [base]
    for k in range(1, -(-samples // base.num_rows)):
        uuids = pa.array([f"{u}-copy{k}" for u in base["uuid"].to_pylist()])
        copies.append(base.set_column(0, base.schema.field(0), uuids))
    full = pa.concat_tables(copies).slice(0, samples)
    for start in range(base.num_rows, full.num_rows, 240):  # fresh uuids: plain appends, ~8 fragments to shard
        table.add(full.slice(start, 240))
    return str(Path(table.uri)), full


class GeoTiffChips(Dataset):
    """One GeoTIFF per chip and per mask, read with rasterio (TorchGeo-style map dataset)."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        with rasterio.open(self.folder / f"chip_{index}.tif") as image, rasterio.open(self.folder / f"mask_{index}.tif") as mask:
            return {"image": torch.from_numpy(image.read()), "mask": torch.from_numpy(mask.read(1))}


def write_geotiffs(folder: Path, rows: pa.Table) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    batch = training_batch_to_tensors(rows.combine_chunks().to_batches()[0])
    for index, (image, mask) in enumerate(zip(batch["image"].numpy(), batch["mask"].numpy())):
        meta = rows["metadata"][index].as_py()
        profile = {"driver": "GTiff", "width": 256, "height": 256, "crs": meta["crs"],
                   "transform": rasterio.Affine(*meta["transform"])}
        with rasterio.open(folder / f"chip_{index}.tif", "w", count=3, dtype="uint8", **profile) as dst:
            dst.write(image)
        with rasterio.open(folder / f"mask_{index}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(mask[None])


class ParquetChips(IterableDataset):
    """Row groups of one Parquet file with the same raw chip bytes; each worker takes every n-th row group."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        parquet = pq.ParquetFile(self.path)
        for group in range(worker, parquet.num_row_groups, workers):
            yield training_batch_to_tensors(parquet.read_row_group(group, columns=COLUMNS).to_batches()[0])


def _throughput(loader: DataLoader) -> float:
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch["image"].shape[0]
    return seen / (time.perf_counter() - start)


def _loader(dataset, workers: int, batched: bool) -> DataLoader:
    options = {"num_workers": workers}
    if workers:  # Lance is not fork-safe: spawned workers, kept alive so epochs after the first are steady state
        options |= {"multiprocessing_context": "spawn", "persistent_workers": True}
    return DataLoader(dataset, batch_size=None if batched else BATCH, **options)


def _best_of(make_loader, epochs: int = 3) -> float:
    """Best epoch of ``epochs`` over one loader (the first epoch pays the worker start-up)."""
    loader = make_loader()
    return max(_throughput(loader) for _ in range(epochs))


def loader_benchmark(samples: int, tmp: Path) -> None:
    lance_raw, rows = build_lance(tmp / "lance", samples, "raw")
    lance_png, _ = build_lance(tmp / "lance", samples, "png")
    write_geotiffs(tmp / "tiffs", rows)
    pq.write_table(rows.select(COLUMNS), tmp / "chips.parquet", row_group_size=BATCH)
    from lance.torch.data import LanceDataset

    def lance_ds(uri):
        return LanceDataset(uri, batch_size=BATCH, columns=COLUMNS, to_tensor_fn=training_batch_to_tensors,
                            shard_granularity="fragment")

    print(f"loader: {samples} chips 3×256×256 uint8 + masks, batch {BATCH}, samples/s (best of 3 epochs)")
    print(f"{'reader':<34}{'0 workers':>12}{'2 workers':>12}")
    results = {}
    readers = {
        "(a) Lance training_data, raw": lambda w: _loader(lance_ds(lance_raw), w, True),
        "(a') Lance training_data, png": lambda w: _loader(lance_ds(lance_png), w, True),
        "(b) GeoTIFF per chip (rasterio)": lambda w: _loader(GeoTiffChips(tmp / "tiffs", samples), w, False),
        "(c) Parquet, raw bytes": lambda w: _loader(ParquetChips(tmp / "chips.parquet"), w, True),
    }
    for name, make in readers.items():
        results[name] = [_best_of(lambda: make(w)) for w in (0, 2)]
        print(f"{name:<34}{results[name][0]:>12.0f}{results[name][1]:>12.0f}")
    shuffled_benchmark(lance_raw, tmp / "chips.parquet", tmp / "tiffs", samples)
    lance, tiff, parquet = (results[k] for k in ("(a) Lance training_data, raw", "(b) GeoTIFF per chip (rasterio)",
                                                 "(c) Parquet, raw bytes"))
    for w, label in ((0, "0 workers"), (1, "2 workers")):
        print(f"ratio Lance/GeoTIFF ({label}): {lance[w] / tiff[w]:.1f}× (goal ≥ 5×); "
              f"Lance/Parquet: {lance[w] / parquet[w]:.2f}× (goal ≥ 1.5×)")


def shuffled_benchmark(lance_uri: str, parquet_path: Path, tiff_folder: Path, samples: int) -> None:
    """Random batches (training with shuffle=True): Lance ``take`` vs Parquet row groups vs GeoTIFF files."""
    import lance

    order = np.random.default_rng(0).permutation(samples)
    batches = [np.sort(order[i : i + BATCH]) for i in range(0, samples, BATCH)]
    dataset = lance.dataset(lance_uri)
    parquet = pq.ParquetFile(parquet_path)
    group_rows = parquet.metadata.row_group(0).num_rows
    tiffs = GeoTiffChips(tiff_folder, samples)

    def lance_batch(rows):
        return training_batch_to_tensors(dataset.take(rows, columns=COLUMNS).to_batches()[0])

    def parquet_batch(rows):
        groups = sorted({int(r) // group_rows for r in rows})
        table = parquet.read_row_groups(groups, columns=COLUMNS)
        starts = {g: k * group_rows for k, g in enumerate(groups)}
        local = [starts[int(r) // group_rows] + int(r) % group_rows for r in rows]
        return training_batch_to_tensors(table.take(local).combine_chunks().to_batches()[0])

    def tiff_batch(rows):
        items = [tiffs[int(r)] for r in rows]
        return {"image": torch.stack([i["image"] for i in items])}

    print(f"shuffled: random batches of {BATCH} over {samples} chips, samples/s, 0 workers (best of 2)")
    rates = {}
    for name, read in (("Lance take", lance_batch), ("Parquet row groups", parquet_batch), ("GeoTIFF files", tiff_batch)):
        best = 0.0
        for _ in range(2):
            start = time.perf_counter()
            seen = sum(read(rows)["image"].shape[0] for rows in batches)
            best = max(best, seen / (time.perf_counter() - start))
        rates[name] = best
        print(f"  {name:<20}{best:>10.0f}")
    print(f"  ratio Lance/GeoTIFF {rates['Lance take'] / rates['GeoTIFF files']:.1f}×, "
          f"Lance/Parquet {rates['Lance take'] / rates['Parquet row groups']:.2f}×")


def filter_benchmark(rows_wanted: int, tmp: Path) -> None:
    """64 chips out of ≥ rows_wanted rows selected by one S2 l13 token, with and without the BTREE index."""
    settings = load_settings().replace(lancedb_root=str(tmp / "filter"))
    uri = str(tmp / "filter" / "training_data")
    build_dataset_from_images(settings, _jiang() / "images", _jiang() / "masks", uri=uri)
    base = lance_io.open_training_table(uri, settings.lancedb_root, create=False).to_arrow()
    groups = -(-rows_wanted // 64)
    rows = pa.concat_tables([base] * -(-groups * 64 // base.num_rows)).slice(0, groups * 64).combine_chunks()
    metadata = rows["metadata"].chunk(0)
    tokens = [f"{0x3000000000000000 + (g << 36):016x}".rstrip("0") for g in range(groups) for _ in range(64)]
    fields = dict(zip((f.name for f in metadata.type), metadata.flatten()))  # flatten() honours the slice offset
    fields["s2_token_l13"] = pa.array(tokens)
    index = rows.schema.get_field_index("metadata")
    rows = rows.set_column(index, rows.schema.field(index),
                           pa.StructArray.from_arrays(list(fields.values()), fields=list(metadata.type)))
    rows = rows.set_column(0, rows.schema.field(0), pa.array([f"r{i}" for i in range(rows.num_rows)]))
    timings = {}
    for indexed in (False, True):
        table = lance_io.open_training_table(str(tmp / "filter" / f"rows_{indexed}"), settings.lancedb_root)
        table.add(rows)
        if indexed:
            lance_io.ensure_scalar_indexes(table)
        samples = []
        for g in range(0, groups, max(groups // 20, 1)):
            start = time.perf_counter()
            got = lance_io.filter_rows(table, {"s2_token_l13": tokens[g * 64]}, columns=["uuid", "vhr_image_chip"])
            samples.append(time.perf_counter() - start)
            assert got.num_rows == 64
        timings[indexed] = statistics.median(samples)
    print(f"filter: 64 of {rows.num_rows} rows by metadata.s2_token_l13 (median of {len(samples)} queries)")
    print(f"  without index {timings[False] * 1e3:.1f} ms, with BTREE index {timings[True] * 1e3:.1f} ms "
          f"→ {timings[False] / timings[True]:.1f}× faster")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1920)
    parser.add_argument("--filter-rows", type=int, default=10_240)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="with_row_id is not supported")
    with tempfile.TemporaryDirectory(prefix="aegir-bench-loader-") as tmp:
        loader_benchmark(args.samples, Path(tmp))
        filter_benchmark(args.filter_rows, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())

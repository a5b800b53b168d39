"""Benchmark: recall@10 of the LanceDB ANN index vs exact search, and query latency vs row count (issue #8).

Data: the real Jiang PV01 tiles (60 chips) built into a temporary ``training_data`` table and embedded with a
checkpoint (``--checkpoint``, else a tiny model trained here for ``--epochs`` epochs with the CLI). Then:

1. "same roof type first": each mask's PV pixels are 211 (flat concrete roof) or 213 (brick roof); for every chip
   with PV, is its nearest neighbour (exact, itself excluded) of the same dominant roof value? Printed beside the
   chance rate (leave-one-out: Σ n_c (n_c − 1) / (n (n − 1))).
2. Scale: the 60 real vectors repeated to each of ``--sizes`` rows (default 10,000; ``--sizes 10000,100000`` for the
   full run) with Gaussian noise (σ = ``--noise`` per dimension, re-normalised), written to a LanceDB table, IVF_PQ
   index (cosine, ≈√N partitions, D/8 sub-vectors; see :func:`aegir.store.embedding_store.ensure_indexes`).
   ``--queries`` fresh noisy copies are searched with the index (nprobes, refine_factor) and exactly
   (``bypass_vector_index``): recall@10 = |ANN top-10 ∩ exact top-10| / 10, median latencies in ms.

Run: ``python bench/vector_search.py [--checkpoint CKPT] [--sizes 10000,100000] [--queries 100]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
JIANG = SHARED_DATA / "vhr" / "jiang_pv01"


def _train(uri: str, out: Path, epochs: int) -> str:
    config = out / "train.toml"
    config.write_text('[train]\nencoder = "resnet18"\nbatch_size = 4\nwandb = false\nprogress_bar = false\n'
                      'threads = 2\n')
    cmd = [sys.executable, "-m", "aegir", "train", "--dataset-uri", uri, "--config", str(config),
           "--max-epochs", str(epochs), "--out", str(out / "run"), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["best_checkpoint"]


def _dominant_roof(mask_path: Path) -> int | None:
    from PIL import Image  # the raw 8-bit values (aegir's read_mask binarises them)

    with Image.open(mask_path) as img:
        values = np.asarray(img)
    values = values[values > 0]
    return int(Counter(values.tolist()).most_common(1)[0][0]) if values.size else None


def roof_agreement(settings, uri: str) -> dict:
    from aegir.pipelines import embeddings
    from aegir.store import embedding_store

    root = embedding_store.embeddings_root(uri, settings.lancedb_root)
    table = embedding_store.open_embeddings_table(root)
    rows = table.search().select(["uuid", "sample_id"]).limit(None).to_arrow().to_pylist()
    roof = {r["uuid"]: _dominant_roof(JIANG / "masks" / f"{r['sample_id']}.bmp") for r in rows}
    labelled = [u for u, v in roof.items() if v is not None]
    same = 0
    for u in labelled:
        result = embeddings.similar_chips(settings, chip=u, k=1, uri=uri, where={"uuid": labelled}, exact=True)
        same += roof[result["neighbours"][0]["uuid"]] == roof[u]
    counts = Counter(roof[u] for u in labelled)
    n = len(labelled)
    chance = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
    return {"chips": n, "roof_counts": dict(counts), "nn_same_roof": same / n, "chance": chance}


def scale_run(base: np.ndarray, rows: int, queries: int, noise: float, workdir: Path, nprobes: int,
              refine: int, seed: int = 0) -> dict:
    from aegir.store import embedding_store

    rng = np.random.default_rng(seed)
    n_base, dim = base.shape

    def noisy(idx: np.ndarray) -> np.ndarray:
        v = base[idx] + rng.normal(scale=noise, size=(len(idx), dim)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    vectors = noisy(np.arange(rows) % n_base)
    table = embedding_store.open_embeddings_table(str(workdir / f"scale_{rows}"), dim=dim)
    for start in range(0, rows, 20_000):
        part = vectors[start : start + 20_000]
        batch = pa.table({"uuid": [f"r{i}" for i in range(start, start + len(part))], "model": ["bench"] * len(part),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), dim),
                          "dataset": ["jiang_pv01"] * len(part)})
        table.add(_with_nulls(batch, table.schema))
    t0 = time.perf_counter()
    info = embedding_store.ensure_indexes(table)
    build_s = time.perf_counter() - t0
    qs = noisy(rng.integers(0, n_base, size=queries))
    recalls, ann_ms, exact_ms = [], [], []
    for q in qs:
        t0 = time.perf_counter()
        exact = embedding_store.search_vectors(table, q, k=10, model="bench", exact=True)
        exact_ms.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ann = embedding_store.search_vectors(table, q, k=10, model="bench", nprobes=nprobes, refine_factor=refine)
        ann_ms.append(1000 * (time.perf_counter() - t0))
        recalls.append(len({h["uuid"] for h in ann} & {h["uuid"] for h in exact}) / 10)
    return {"rows": rows, "index": info.get("vector_index"), "partitions": info.get("num_partitions"),
            "sub_vectors": info.get("num_sub_vectors"), "index_build_s": round(build_s, 2),
            "recall_at_10": round(float(np.mean(recalls)), 4), "ann_p50_ms": round(statistics.median(ann_ms), 2),
            "exact_p50_ms": round(statistics.median(exact_ms), 2)}


def _with_nulls(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    cols = [batch.column(f.name) if f.name in batch.column_names else pa.nulls(batch.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="best.ckpt to embed with (default: train a tiny one here)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the tiny model when no --checkpoint")
    parser.add_argument("--sizes", default="10000", help="comma-separated row counts (e.g. 10000,100000)")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.01, help="σ of the per-dimension noise of the copies")
    parser.add_argument("--nprobes", type=int, default=20)
    parser.add_argument("--refine", type=int, default=50, help="refine_factor (exact re-rank of k×refine)")
    args = parser.parse_args()

    from aegir.config import Settings
    from aegir.pipelines import embeddings
    from aegir.pipelines.dataset import build_dataset_from_images
    from aegir.store import embedding_store

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        settings = Settings(lancedb_root=str(work / "lancedb"))
        uri = str(work / "lancedb" / "training_data")
        build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", uri, "jiang_pv01")
        t0 = time.perf_counter()
        checkpoint = args.checkpoint or _train(uri, work, args.epochs)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        report = embeddings.embed_training_chips(settings, checkpoint, uri)
        embed_s = time.perf_counter() - t0
        print(f"model {report.model}: {report.embedded} chips embedded ({report.dim}-d) in {embed_s:.1f} s"
              + ("" if args.checkpoint else f" (tiny model trained {args.epochs} epoch(s) in {train_s:.0f} s)"))
        roof = roof_agreement(settings, uri)
        print(f"same roof type as nearest neighbour: {roof['nn_same_roof']:.3f} vs chance {roof['chance']:.3f} "
              f"({roof['chips']} chips with PV, roof values {roof['roof_counts']})")
        table = embedding_store.open_embeddings_table(embedding_store.embeddings_root(uri, settings.lancedb_root))
        base = np.array(table.search().select(["vector"]).limit(None).to_arrow().column(0).to_pylist(),
                        dtype=np.float32)
        print(f"{'rows':>8} {'index':>7} {'parts':>5} {'subv':>4} {'build s':>7} {'recall@10':>9} "
              f"{'ANN ms':>7} {'exact ms':>8} {'speed-up':>8}")
        for rows in [int(s) for s in args.sizes.split(",")]:
            r = scale_run(base, rows, args.queries, args.noise, work, args.nprobes, args.refine)
            print(f"{r['rows']:>8} {r['index']:>7} {r['partitions']:>5} {r['sub_vectors']:>4} "
                  f"{r['index_build_s']:>7} {r['recall_at_10']:>9} {r['ann_p50_ms']:>7} {r['exact_p50_ms']:>8} "
                  f"{r['exact_p50_ms'] / r['ann_p50_ms']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()

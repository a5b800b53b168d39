"""Embedding jobs: chip embeddings and vector search (``aegir dataset embed``, ``aegir search similar``), tile-window
embeddings (``aegir infer embed-tiles``, ``aegir search tiles``) and two embedding hooks over a region's detections (hard-negative
mining, find more like this).

Chips are read through :mod:`aegir.store.lance_io`, tiles through :mod:`aegir.store.region_files`; the
:mod:`aegir.dataflows.chip_embeddings` / :mod:`~aegir.dataflows.tile_embeddings` DAGs cut and encode them and vectors
are written and searched through :mod:`aegir.store.embedding_store`. The hooks' logic is
:mod:`aegir.dataflows.embedding_hooks`: its query vectors come out of the DAG, this module runs the store's vector
search for each, and the neighbours go back in.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa
import shapely

from aegir.config import Settings
from aegir.dataflows import chip_embeddings, tile_embeddings
from aegir.pipelines import STAGES, build_driver
from aegir.store import embedding_store, lance_io, region_files, run_files
from aegir.store.mask_files import read_image_chip
from aegir.utils import geo

EMBED_BATCH = 32


@dataclass
class EmbedReport:
    """Outcome of one :func:`embed_training_chips` run."""

    table: str
    model: str
    dim: int
    source_version: int
    rows_in_source: int
    embedded: int
    skipped_existing: int
    inserted: int
    updated: int
    version: int
    index: dict[str, Any] = field(default_factory=dict)


@dataclass
class TileEmbedReport:
    """Outcome of one :func:`embed_region_tiles` run (``windows`` = embedded + skipped_existing)."""

    table: str
    model: str
    dim: int
    region: str
    tiles: int
    windows: int
    embedded: int
    skipped_existing: int
    version: int
    cells: int
    tiles_skipped: list[dict] = field(default_factory=list)
    index: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def load_encoder(checkpoint: str | Path | None = None, encoder_weights: str | Path | None = None,
                 encoder_name: str | None = None, device: str | None = None):
    """A :class:`~aegir.training.embedder.ChipEncoder` from a checkpoint, or from local pretrained weights."""
    from aegir.training import embedder

    if checkpoint is not None:
        return embedder.encoder_from_checkpoint(checkpoint, device)
    if encoder_weights is None or encoder_name is None:
        raise ValueError("give --checkpoint, or --encoder-weights with --encoder")
    return embedder.encoder_from_pretrained(encoder_name, encoder_weights, device)


# ---- chip embeddings (training_data) ----------------------------------------------------------------------------


def embed_training_chips(settings: Settings, checkpoint: str | Path | None = None, uri: str | None = None,
                         table_name: str = embedding_store.DEFAULT_EMBEDDINGS_TABLE, batch_size: int = EMBED_BATCH,
                         refresh: bool = False, device: str | None = None, encoder_weights: str | None = None,
                         encoder_name: str | None = None, build_index: bool = True,
                         progress: Callable[[int], None] | None = None) -> EmbedReport:
    """Embed every ``training_data`` chip that has no vector from this model yet (all of them with ``refresh``).

    Idempotent: vectors are keyed by (uuid, model id = content hash of the weights); a second run embeds nothing.
    """
    encoder = load_encoder(checkpoint, encoder_weights, encoder_name, device)
    training = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    table = embedding_store.open_embeddings_table(root, table_name, dim=encoder.dim)
    source_version = training.version
    all_uuids = lance_io.filter_rows(training, {}, columns=["uuid"]).column(0).to_pylist()
    done = set() if refresh else embedding_store.embedded_uuids(table, encoder.model_id)
    todo = [u for u in all_uuids if u not in done]
    context = {"model": encoder.model_id, "model_checkpoint": encoder.checkpoint,
               "model_data_version": encoder.data_version, "source_table": f"{root}/{name}",
               "source_version": source_version, "embedded_at": dt.datetime.now(dt.timezone.utc)}
    dag = build_driver([chip_embeddings])
    inserted = updated = 0
    version = table.version
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        batch = lance_io.filter_rows(training, {"uuid": chunk}, columns=["uuid", "vhr_image_chip", "metadata"])
        rows = dag.execute(["embedding_rows"], inputs={"chip_batch": batch, "encode_chips": encoder.encode,
                                                       "embedding_context": context})["embedding_rows"]
        result = embedding_store.upsert_embeddings(table, rows)
        inserted, updated, version = inserted + result["inserted"], updated + result["updated"], result["version"]
        if progress:
            progress(len(chunk))
    index = embedding_store.ensure_indexes(table) if build_index else {}
    return EmbedReport(f"{root}/{table_name}", encoder.model_id, encoder.dim, source_version, len(all_uuids),
                       len(todo), len(all_uuids) - len(todo), inserted, updated, version, index)


def _image_vector(encoder: Any, image: str | Path):
    """(D,) unit vector of an image file embedded with ``encoder``."""
    return chip_embeddings.normalised_vectors(encoder.encode(read_image_chip(image).rgb8()[None]))[0]


def _checked_image_encoder(entry: dict, checkpoint: str | Path | None, device: str | None):
    """The encoder of the stored vectors' model (``entry``), loaded from ``checkpoint`` or the recorded one."""
    ckpt = checkpoint or entry["model_checkpoint"]
    if not ckpt or not run_files.is_file(ckpt):
        raise ValueError(f"the checkpoint of model {entry['model']} ({ckpt}) is not here; pass --checkpoint")
    if not str(entry["model"]).startswith("ckpt:"):
        raise ValueError("--image search needs a checkpoint model (pretrained-encoder models: embed the image "
                         "with the same weights through the Python API)")
    encoder = load_encoder(checkpoint=ckpt, device=device)
    if encoder.model_id != entry["model"]:
        raise ValueError(f"{ckpt} is model {encoder.model_id}, the vectors are from {entry['model']}")
    return encoder


def similar_chips(settings: Settings, chip: str | None = None, image: str | Path | None = None,
                  where: Sequence[str] | dict | None = None, k: int = 10, uri: str | None = None,
                  table_name: str = embedding_store.DEFAULT_EMBEDDINGS_TABLE, model: str | None = None,
                  checkpoint: str | Path | None = None, include_self: bool = False, exact: bool = False,
                  device: str | None = None) -> dict[str, Any]:
    """The ``k`` chips nearest to a stored chip (``chip`` uuid) or to an image file (embedded with the model's
    checkpoint), among those matching ``where`` (``key=value`` strings or a dict, validated).

    Returns ``{"model", "query", "filters", "search", "neighbours": [{uuid, distance, dataset, sample_id, …}]}``.
    """
    if (chip is None) == (image is None):
        raise ValueError("give exactly one of --chip UUID or --image FILE")
    filters = (embedding_store.validate_filters(where) if isinstance(where, dict)
               else embedding_store.parse_where(where))
    root = embedding_store.embeddings_root(uri, settings.lancedb_root)
    table = embedding_store.open_embeddings_table(root, table_name)
    entry = embedding_store.resolve_model(table, model)
    exclude: list[str] = []
    if chip is not None:
        vector = embedding_store.stored_vector(table, chip, entry["model"])
        exclude = [] if include_self else [chip]
        query = {"chip": chip}
    else:
        vector = _image_vector(_checked_image_encoder(entry, checkpoint, device), image)
        query = {"image": str(image)}
    neighbours = embedding_store.search_vectors(table, vector, k=k, filters=filters, model=entry["model"],
                                                exclude_uuids=exclude, exact=exact)
    search = "exact" if exact or not embedding_store.has_vector_index(table) else "ann"
    filters_out = {k_: (v.isoformat() if isinstance(v, dt.datetime) else v) for k_, v in filters.items()}
    return {"model": entry["model"], "query": query, "filters": filters_out, "search": search,
            "neighbours": neighbours}


# ---- tile-window embeddings (region tiles) ----------------------------------------------------------------------


def tile_table(settings: Settings, dim: int | None = None,
               name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE):
    """The ``tile_embeddings`` table under the LanceDB root (created for ``dim``-vectors when missing)."""
    run_files.ensure_dir(settings.lancedb_root)
    return embedding_store.open_tile_embeddings_table(settings.lancedb_root, name, dim)


def _index_tiles(tiles_dir: str | Path) -> tuple[list[region_files.TileRef], list[dict]]:
    tiles, skipped = region_files.tile_index(tiles_dir)
    if not tiles:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"{tiles_dir}: no tile can be placed on the map ({reasons or 'no image files'})")
    return tiles, skipped


def _read_tile(tile: region_files.TileRef):
    return region_files.read_tile_window(tile, tile.bounds, tile.crs)


def embed_region_tiles(settings: Settings, encoder: Any, tiles_dir: str | Path, plan_level: int = 14,
                       window_px: int = 256, stride_px: int | None = None, batch_size: int = EMBED_BATCH,
                       table_name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE, build_index: bool = True,
                       progress: Callable[[int, int], None] | None = None) -> TileEmbedReport:
    """Embed every ``window_px``² window (stride ``stride_px``, default ``window_px``) of the tiles region inference
    reads from ``tiles_dir`` with ``encoder`` (a :class:`~aegir.training.embedder.ChipEncoder`), ``batch_size``
    windows per encoder call and per commit. Idempotent: windows already embedded by this model are skipped
    before their pixels are encoded. ``progress(tiles done, tiles)`` per tile."""
    started = time.perf_counter()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    tiles, skipped = _index_tiles(tiles_dir)
    table = tile_table(settings, encoder.dim, table_name)
    region = embedding_store.region_key(tiles_dir)
    done = {u for u in embedding_store.tile_windows(table, encoder.model_id, region, ["uuid"])["uuid"].to_pylist()}
    context = {"model": encoder.model_id, "model_checkpoint": encoder.checkpoint,
               "model_data_version": encoder.data_version, "region": region,
               "tiles_dir": str(Path(tiles_dir).absolute()), "embedded_at": dt.datetime.now(dt.timezone.utc)}
    dag = build_driver([tile_embeddings])
    counts = {"windows": 0, "embedded": 0}
    pending: list = []

    def flush() -> None:
        if pending:
            rows = dag.execute(["tile_embedding_rows"], inputs={
                "window_chips": list(pending), "encode_chips": encoder.encode, "plan_level": plan_level,
                "embedding_context": context})["tile_embedding_rows"]
            embedding_store.upsert_embeddings(table, rows)
            counts["embedded"] += len(pending)
            pending.clear()

    for number, tile in enumerate(tiles, start=1):
        windows = dag.execute(["tile_window_chips"], inputs={
            "tile_chip": _read_tile(tile), "tile_path": str(Path(tile.path).absolute()), "window_px": window_px,
            "stride_px": stride_px or window_px})["tile_window_chips"]
        counts["windows"] += len(windows)
        for chip in windows:
            if chip.extras["uuid"] not in done:
                pending.append(chip)
                if len(pending) >= batch_size:
                    flush()
        if progress:
            progress(number, len(tiles))
    flush()
    cells = len(set(embedding_store.tile_windows(table, encoder.model_id, region, ["cell_token"])["cell_token"]
                    .to_pylist()))
    index = (embedding_store.ensure_indexes(table, scalar_columns=embedding_store.TILE_SCALAR_INDEX_COLUMNS)
             if build_index else {})
    return TileEmbedReport(f"{settings.lancedb_root}/{table_name}", encoder.model_id, encoder.dim, region, len(tiles),
                           counts["windows"], counts["embedded"], counts["windows"] - counts["embedded"],
                           int(table.version), cells, skipped, index, round(time.perf_counter() - started, 2))


def similar_tiles(settings: Settings, checkpoint: str | Path, tiles_dir: str | Path, image: str | Path, k: int = 10,
                  device: str | None = None,
                  table_name: str = embedding_store.DEFAULT_TILE_EMBEDDINGS_TABLE) -> dict[str, Any]:
    """The ``k`` windows of the region ``tiles_dir`` nearest to an image file, both embedded with ``checkpoint``.

    Returns ``{"model", "region", "query", "neighbours": [{uuid, distance, tile_path, window_col, window_row,
    window_px, cell_token, centroid_lon, centroid_lat}]}`` (exact search, nearest first).
    """
    if not run_files.is_file(image):
        raise FileNotFoundError(f"{image}: no such image file")
    encoder = load_encoder(checkpoint=checkpoint, device=device)
    table = tile_table(settings, name=table_name)
    region = embedding_store.region_key(tiles_dir)
    hits = embedding_store.search_tile_windows(table, _image_vector(encoder, image), k, encoder.model_id, region)
    if not hits and embedding_store.tile_windows(table, encoder.model_id, region, ["uuid"]).num_rows == 0:
        raise ValueError(f"no windows of {tiles_dir} embedded by {encoder.model_id}: run `aegir infer embed-tiles` "
                         "with this checkpoint first")
    keep = ("uuid", "distance", "tile_path", "window_col", "window_row", "window_px", "cell_token", "centroid_lon",
            "centroid_lat")
    return {"model": encoder.model_id, "region": region, "query": str(image),
            "neighbours": [{key: hit[key] for key in keep} for hit in hits]}


# ---- the embedding hooks over a region's detections ------------------------------------------------------------


def region_label_geometries(settings: Settings, bounds: tuple[float, float, float, float]) -> list:
    """Known PV label geometries (EPSG:4326) of the lakehouse intersecting ``bounds`` (empty without labels)."""
    from aegir.store import ducklake

    con = ducklake.connect(settings)
    try:
        if not ducklake.label_tables(con, settings):
            return []
        labels = ducklake.query_labels(con, settings, ducklake.LabelQuery(bbox=tuple(bounds)))
    finally:
        con.close()
    return list(shapely.from_wkb(labels["geometry_wkb"].to_pylist())) if labels.num_rows else []


@dataclass(frozen=True)
class _HookSearch:
    """The store's pre-filtered nearest-window search over one model's windows of one region."""

    table: Any
    model: str
    region: str

    def neighbours(self, vectors, k: int, exclude_uuids: list[str]) -> list[list[dict]]:
        """Per (D,) query vector, its ``k`` nearest windows not in ``exclude_uuids``, nearest first."""
        return [embedding_store.search_tile_windows(self.table, vector, k, self.model, self.region, exclude_uuids)
                for vector in vectors]


def _hook_inputs(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                 tiles_dir: str | Path, crop_px: int, round_index: int) -> tuple[dict[str, Any], _HookSearch]:
    """The DAG inputs both hooks share (queries, encoder, the region's windows, labels) and the store's search."""
    table = tile_table(settings)
    region = embedding_store.region_key(tiles_dir)
    windows = embedding_store.tile_windows(table, encoder.model_id, region)
    if windows.num_rows == 0:
        raise ValueError(f"no tile windows of {tiles_dir} embedded by model {encoder.model_id}: "
                         "run embed_region_tiles (`aegir infer embed-tiles`) with the same checkpoint first")
    bounds = shapely.union_all(shapely.from_wkb(windows["footprint_wkb"].to_pylist())).bounds
    inputs = {"detections": detections, "validation_decisions": decisions, "detection_tiles": detection_tiles,
              "crop_px": crop_px, "encode_chips": encoder.encode, "region_windows": windows,
              "label_geometries": region_label_geometries(settings, bounds), "round_index": round_index}
    return inputs, _HookSearch(table, encoder.model_id, region)


def _run_hook(inputs: dict[str, Any], search: _HookSearch, side: str, k: int, excluded: str,
              outputs: list[str]) -> dict[str, Any]:
    """One hook's DAG in two passes: the ``side`` ("rejected" / "accepted") query chips, their vectors and the
    ``excluded`` windows; the store's ``k``-nearest search per vector; then ``outputs`` from the neighbours."""
    dag = build_driver(STAGES["embedding_hooks"])
    chips, vectors = f"{side}_query_chips", f"{side}_query_vectors"
    queries = dag.execute([chips, vectors, excluded], inputs=inputs)
    neighbours = search.neighbours(queries[vectors], k, queries[excluded])
    return dag.execute(outputs, inputs=inputs | {f"{side}_query_neighbours": neighbours},
                       overrides={chips: queries[chips]})


def mine_hard_negatives(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                        tiles_dir: str | Path, crop_px: int = 256, mine_k: int = 5, max_mined: int = 32,
                        max_queries: int = 64, round_index: int = 0) -> pa.Table:
    """Hook (a): tile windows nearest to the rejected detections, proposed as negatives (schema
    :data:`aegir.dataflows.embedding_hooks.HIT_SCHEMA`; none overlaps a detection or a known label)."""
    inputs, search = _hook_inputs(settings, encoder, detections, decisions, detection_tiles, tiles_dir, crop_px,
                                  round_index)
    inputs |= {"max_hard_negatives": max_queries, "max_mined": max_mined}
    out = _run_hook(inputs, search, "rejected", mine_k, "mining_excluded_windows", ["mined_negative_proposals"])
    return out["mined_negative_proposals"]


def find_similar_tiles(settings: Settings, encoder: Any, detections, decisions: pa.Table, detection_tiles: dict,
                       tiles_dir: str | Path, crop_px: int = 256, similar_k: int = 5, max_queries: int = 64,
                       round_index: int = 0) -> tuple[pa.Table, dict[str, float]]:
    """Hook (b): the unlabelled windows nearest to the accepted detections and the boost of each grid-plan cell
    holding them (token → Σ (1 − d/2))."""
    inputs, search = _hook_inputs(settings, encoder, detections, decisions, detection_tiles, tiles_dir, crop_px,
                                  round_index)
    inputs |= {"max_backfill": max_queries}
    out = _run_hook(inputs, search, "accepted", similar_k, "similar_excluded_windows",
                    ["similar_tile_hits", "cell_boosts"])
    return out["similar_tile_hits"], out["cell_boosts"]


def window_chips(hits: pa.Table, tiles_dir: str | Path) -> list:
    """The tile windows of ``hits`` (``tile_path``, ``window_col/row/px``, ``footprint_wkb``) cut from the tiles of
    ``tiles_dir``, as Chips whose ``extras`` hold ``sample_id`` (the window uuid), ``source_detection``,
    ``prompt_wkb`` (the footprint) and ``provenance`` (distance, window, rank, round): ready for ``training_data``."""
    tiles = {str(Path(t.path).absolute()): t for t in _index_tiles(tiles_dir)[0]} if hits.num_rows else {}
    loaded: dict[str, Any] = {}
    out = []
    for row in hits.to_pylist():
        tile = tiles.get(row["tile_path"])
        if tile is None:
            raise FileNotFoundError(f"{row['tile_path']}: the tile of window {row['window_uuid']} is not in "
                                    f"{tiles_dir}")
        if row["tile_path"] not in loaded:
            loaded[row["tile_path"]] = _read_tile(tile)
        chip = geo.chip_window(loaded[row["tile_path"]], row["window_col"], row["window_row"], row["window_px"])
        chip.extras.update(sample_id=row["window_uuid"], source_detection=row["source_detection"],
                           prompt_wkb=row["footprint_wkb"],
                           provenance={"distance": row["distance"], "window_uuid": row["window_uuid"],
                                       "neighbour_rank": row["neighbour_rank"], "mined_round": row["round"]})
        out.append(chip)
    return out


def detection_tiles(detections, tiles_dir: Path) -> dict[str, Any]:
    """detection_id → the region tile (Chip) whose footprint holds the detection's centroid. Footprints come from
    the tile index (file headers); only the tiles that hold a detection are read."""
    import shapely

    from aegir.store import mask_files, region_files

    tiles, _ = region_files.tile_index(tiles_dir)
    tree = shapely.STRtree([t.footprint for t in tiles])
    loaded: dict[int, Any] = {}
    out = {}
    for detection_id, geometry in zip(detections["detection_id"].astype(str), detections.geometry):
        hits = tree.query(shapely.centroid(geometry), predicate="within")
        if len(hits):
            index = int(hits[0])
            if index not in loaded:
                loaded[index] = mask_files.read_image_chip(tiles[index].path)
            out[detection_id] = loaded[index]
    return out

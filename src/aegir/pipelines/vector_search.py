"""Jobs for chip embeddings and vector search (called by ``aegir dataset embed`` and ``aegir search similar``).

Reads chips through :mod:`aegir.store.lance_io`, runs the :mod:`aegir.dataflows.chip_embeddings` DAG per batch and
writes through :mod:`aegir.store.embedding_store`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from aegir.config import Settings
from aegir.dataflows import chip_embeddings
from aegir.store import embedding_store, lance_io

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


def load_encoder(checkpoint: str | Path | None = None, encoder_weights: str | Path | None = None,
                 encoder_name: str | None = None, device: str | None = None):
    """A :class:`~aegir.training.embedder.ChipEncoder` from a checkpoint, or from local pretrained weights."""
    from aegir.training import embedder

    if checkpoint is not None:
        return embedder.encoder_from_checkpoint(checkpoint, device)
    if encoder_weights is None or encoder_name is None:
        raise ValueError("give --checkpoint, or --encoder-weights with --encoder")
    return embedder.encoder_from_pretrained(encoder_name, encoder_weights, device)


def embed_training_chips(settings: Settings, checkpoint: str | Path | None = None, uri: str | None = None,
                         table_name: str = embedding_store.DEFAULT_EMBEDDINGS_TABLE, batch_size: int = EMBED_BATCH,
                         refresh: bool = False, device: str | None = None, encoder_weights: str | None = None,
                         encoder_name: str | None = None, build_index: bool = True,
                         progress: Callable[[int], None] | None = None) -> EmbedReport:
    """Embed every ``training_data`` chip that has no vector from this model yet (all of them with ``refresh``).

    Idempotent: vectors are keyed by (uuid, model id = content hash of the weights); a second run embeds nothing.
    """
    from aegir.pipelines import build_driver

    encoder = load_encoder(checkpoint, encoder_weights, encoder_name, device)
    training = lance_io.open_training_table(uri, settings.lancedb_root, create=False)
    root, name = lance_io.resolve_table_location(uri, settings.lancedb_root)
    table = embedding_store.open_embeddings_table(root, table_name, dim=encoder.dim)
    source_version = training.version
    all_uuids = training.search().select(["uuid"]).limit(None).to_arrow().column(0).to_pylist()
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
        if not include_self:
            exclude = [chip]
        query = {"chip": chip}
    else:
        from aegir.store.mask_files import read_image_chip

        ckpt = checkpoint or entry["model_checkpoint"]
        if not ckpt or not Path(ckpt).is_file():
            raise ValueError(f"the checkpoint of model {entry['model']} ({ckpt}) is not here; pass --checkpoint")
        if not str(entry["model"]).startswith("ckpt:"):
            raise ValueError("--image search needs a checkpoint model (pretrained-encoder models: embed the image "
                             "with the same weights through the Python API)")
        encoder = load_encoder(checkpoint=ckpt, device=device)
        if encoder.model_id != entry["model"]:
            raise ValueError(f"{ckpt} is model {encoder.model_id}, the vectors are from {entry['model']}")
        pixels = read_image_chip(image).rgb8()
        vector = chip_embeddings.normalised_vectors(encoder.encode(pixels[None]))[0]
        query = {"image": str(image)}
    neighbours = embedding_store.search_vectors(table, vector, k=k, filters=filters, model=entry["model"],
                                                exclude_uuids=exclude, exact=exact)
    search = "exact" if exact or not embedding_store.has_vector_index(table) else "ann"
    filters_out = {k_: (v.isoformat() if isinstance(v, dt.datetime) else v) for k_, v in filters.items()}
    return {"model": entry["model"], "query": query, "filters": filters_out, "search": search,
            "neighbours": neighbours}

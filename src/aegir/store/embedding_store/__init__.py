"""LanceDB embedding tables beside ``training_data``: ``chip_embeddings`` (one vector per training chip and model,
:mod:`.chips`) and ``tile_embeddings`` (one per imagery window of region inference, :mod:`.tiles`); what they
share (open, upsert, indexes, nearest-neighbour search) is in :mod:`.vectors`, the validated user filters in
:mod:`.filters`.
"""

from aegir.store.embedding_store.chips import (
    DEFAULT_EMBEDDINGS_TABLE,
    FILTER_COPIES,
    RESULT_COLUMNS,
    embedded_uuids,
    embedding_models,
    embeddings_schema,
    open_embeddings_table,
    resolve_model,
    search_vectors,
    stored_vector,
)
from aegir.store.embedding_store.filters import (
    DATE_FIELDS,
    FILTER_FIELDS,
    SAFE_VALUE,
    filter_clause,
    parse_where,
    validate_filters,
)
from aegir.store.embedding_store.tiles import (
    DEFAULT_TILE_EMBEDDINGS_TABLE,
    TILE_RESULT_COLUMNS,
    TILE_SCALAR_INDEX_COLUMNS,
    open_tile_embeddings_table,
    region_key,
    search_tile_windows,
    tile_embeddings_schema,
    tile_windows,
)
from aegir.store.embedding_store.vectors import (
    DEFAULT_NPROBES,
    DEFAULT_REFINE,
    MIN_INDEX_ROWS,
    SCALAR_INDEX_COLUMNS,
    embeddings_root,
    ensure_indexes,
    has_vector_index,
    upsert_embeddings,
    vector_dim,
)

__all__ = [
    "DATE_FIELDS",
    "DEFAULT_EMBEDDINGS_TABLE",
    "DEFAULT_NPROBES",
    "DEFAULT_REFINE",
    "DEFAULT_TILE_EMBEDDINGS_TABLE",
    "FILTER_COPIES",
    "FILTER_FIELDS",
    "MIN_INDEX_ROWS",
    "RESULT_COLUMNS",
    "SAFE_VALUE",
    "SCALAR_INDEX_COLUMNS",
    "TILE_RESULT_COLUMNS",
    "TILE_SCALAR_INDEX_COLUMNS",
    "embedded_uuids",
    "embedding_models",
    "embeddings_root",
    "embeddings_schema",
    "ensure_indexes",
    "filter_clause",
    "has_vector_index",
    "open_embeddings_table",
    "open_tile_embeddings_table",
    "parse_where",
    "region_key",
    "resolve_model",
    "search_tile_windows",
    "search_vectors",
    "stored_vector",
    "tile_embeddings_schema",
    "tile_windows",
    "upsert_embeddings",
    "validate_filters",
    "vector_dim",
]

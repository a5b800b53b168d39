"""The ``training_data`` schema: one row per training sample (a PV prompt, its image chips and its mask).

The S2 token fields (``metadata.s2_token_l<level>``, one per level of ``Settings.s2_levels``) and the H3 field
(``metadata.h3_<resolution>``, ``Settings.h3_resolution``) follow the configuration: :func:`training_data_schema`
builds the schema for given levels; :data:`TRAINING_DATA_SCHEMA` is the one for the defaults (levels 10, 13, 17;
H3 resolution 12). A stored table's own levels are read back from its schema (:func:`stored_s2_levels`).
"""

from __future__ import annotations

import re
from typing import Sequence

import pyarrow as pa

from aegir.config import DEFAULT_H3_RESOLUTION, DEFAULT_S2_LEVELS
from aegir.store.errors import StoreError as _BaseStoreError

DEFAULT_TABLE = "training_data"
# Lance file format of new tables. Measured here (bench/loader.py, 1,920 Jiang chips of 3×256×256 + masks,
# lance.torch.data, 0 workers): format 2.0 streams ~10,000 samples/s, the default 2.1 ~2,400 samples/s, because
# 2.1's encoding of large binary values decodes far slower. Chips are large binaries, so 2.0 it is.
DATA_STORAGE_VERSION = "2.0"
CHIP_ENCODINGS = ("raw", "png", "tiff")

_UTC_US = pa.timestamp("us", tz="UTC")
_SHAPE = pa.list_(pa.int32())
_S2_FIELD = re.compile(r"s2_token_l(\d{1,2})")
_H3_FIELD = re.compile(r"h3_(\d{1,2})")


class StoreError(_BaseStoreError):
    """The training table cannot be opened, read or written as asked."""


PROVENANCE_TYPE = pa.struct(
    [
        pa.field("backend", pa.string()),
        pa.field("backend_version", pa.string()),
        pa.field("params_json", pa.string()),
        pa.field("round", pa.int32()),
        pa.field("source_detection", pa.string()),
        pa.field("created_at", _UTC_US),
        pa.field("code_version", pa.string()),
    ]
)


# Where a row's mask came from, end to end (rows built from the lakehouse; null for other builds): the labels
# (dataset + row_hash) and DuckLake snapshot, the catalogued image, every prompt in the row's pixel grid
# (``prompts_json``: [{dataset, row_hash, kind, box [x0, y0, x1, y1] | point [x, y], clipped}]), the Mask Factory
# backend with version and parameters, and the build (``build_id``: its record in the lakehouse's
# ``dataset_builds`` table pairs the Lance version with the DuckLake snapshot).
LINEAGE_TYPE = pa.struct(
    [
        pa.field("label_datasets", pa.list_(pa.string())),
        pa.field("label_row_hashes", pa.list_(pa.string())),
        pa.field("ducklake_snapshot_id", pa.int64()),
        pa.field("image_id", pa.string()),
        pa.field("image_uri", pa.string()),
        pa.field("prompt_kinds", pa.list_(pa.string())),
        pa.field("prompts_json", pa.string()),
        pa.field("backend", pa.string()),
        pa.field("backend_version", pa.string()),
        pa.field("backend_params_json", pa.string()),
        pa.field("build_id", pa.string()),
        pa.field("built_at", _UTC_US),
    ]
)
# Columns added after the first tables were written: :func:`aegir.store.lance_io.table.open_training_table` adds
# them (all null) to an older table, so a table built before them keeps working.
ADDED_COLUMNS: tuple[pa.Field, ...] = (pa.field("truth_mask", pa.binary()), pa.field("lineage", LINEAGE_TYPE))


def metadata_type(s2_levels: Sequence[int] = DEFAULT_S2_LEVELS, h3_resolution: int = DEFAULT_H3_RESOLUTION
                  ) -> pa.StructType:
    """The ``metadata`` struct with one ``s2_token_l<level>`` field per level (ascending) and ``h3_<resolution>``."""
    return pa.struct(
        [
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("source_file", pa.string(), nullable=False),
            pa.field("sample_id", pa.string(), nullable=False),
            *(pa.field(f"s2_token_l{level}", pa.string(), nullable=False) for level in sorted(set(s2_levels))),
            pa.field(f"h3_{int(h3_resolution)}", pa.string(), nullable=False),
            pa.field("centroid_lat", pa.float64(), nullable=False),
            pa.field("centroid_lon", pa.float64(), nullable=False),
            pa.field("acquired_at", _UTC_US),
            pa.field("sensor", pa.string()),
            pa.field("gsd_m", pa.float64()),
            pa.field("crs", pa.string()),
            pa.field("transform", pa.list_(pa.float64())),
            pa.field("vhr_shape", _SHAPE, nullable=False),
            pa.field("vhr_dtype", pa.string(), nullable=False),
            pa.field("vhr_encoding", pa.string(), nullable=False),
            pa.field("msi_shape", _SHAPE),
            pa.field("msi_dtype", pa.string()),
            pa.field("msi_bands", pa.list_(pa.string())),
            pa.field("mask_shape", _SHAPE),
            pa.field("mask_encoding", pa.string()),
            pa.field("mask_source", pa.string()),
            pa.field("pv_fraction", pa.float32()),
            pa.field("provenance", PROVENANCE_TYPE),
        ]
    )


def training_data_schema(s2_levels: Sequence[int] = DEFAULT_S2_LEVELS, h3_resolution: int = DEFAULT_H3_RESOLUTION
                         ) -> pa.Schema:
    """The ``training_data`` table schema for these S2 levels and H3 resolution.

    Masks: ``truth_mask`` holds a dataset's own pixel ground truth and is only written by ground-truth builds;
    ``generated_mask`` holds a mask made by the Mask Factory or the flywheel and never replaces ``truth_mask``.
    Both use ``metadata.mask_encoding`` / ``mask_shape`` (the chip's grid); ``metadata.mask_source`` names where
    the generated mask came from (``ground_truth`` when the row has only truth). The training target is chosen by
    :data:`MASK_TARGETS` (default ``auto``: the truth where a row has it, else the generated mask)."""
    return pa.schema(
        [
            pa.field("uuid", pa.string(), nullable=False),
            pa.field("prompt_geometry", pa.binary(), nullable=False),
            pa.field("vhr_image_chip", pa.binary(), nullable=False),
            pa.field("generated_mask", pa.binary()),
            pa.field("msi_image_chip", pa.binary()),
            pa.field("metadata", metadata_type(s2_levels, h3_resolution), nullable=False),
            *ADDED_COLUMNS,
        ]
    )


MASK_TARGETS = ("auto", "truth", "generated")
MASK_IGNORE = 2  # a stored raw mask's "no opinion" value (pseudo-labels): never trained on, never scored


def mask_target_filter(target: str = "auto") -> str:
    """Lance SQL selecting rows that have a training mask for ``target`` (one of :data:`MASK_TARGETS`)."""
    if target not in MASK_TARGETS:
        raise StoreError(f"mask target {target!r} must be one of {', '.join(MASK_TARGETS)}")
    return {"auto": "(truth_mask IS NOT NULL OR generated_mask IS NOT NULL)", "truth": "truth_mask IS NOT NULL",
            "generated": "generated_mask IS NOT NULL"}[target]


def training_mask(batch: pa.Table | pa.RecordBatch | dict, target: str = "auto") -> pa.Array:
    """The training-target mask bytes of every row of ``batch`` for ``target`` (see :data:`MASK_TARGETS`):
    ``auto`` takes ``truth_mask`` where a row has one, else ``generated_mask``; a batch without
    ``truth_mask`` (an older read) uses ``generated_mask``. Null where the row has no such mask."""
    import pyarrow.compute as pc

    mask_target_filter(target)
    names = batch.column_names if hasattr(batch, "column_names") else list(batch)

    def column(name: str) -> pa.Array:
        array = batch[name]
        return array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array

    if "truth_mask" not in names or target == "generated":
        return column("generated_mask")
    if target == "truth":
        return column("truth_mask")
    return pc.coalesce(column("truth_mask"), column("generated_mask"))


def index_columns(s2_levels: Sequence[int] = DEFAULT_S2_LEVELS) -> tuple[str, ...]:
    """Columns given a BTREE index: ``uuid``, ``metadata.dataset`` and every ``metadata.s2_token_l<level>``."""
    return ("uuid", "metadata.dataset", *(f"metadata.s2_token_l{level}" for level in sorted(set(s2_levels))))


METADATA_TYPE: pa.StructType = metadata_type()
TRAINING_DATA_SCHEMA: pa.Schema = training_data_schema()
INDEX_COLUMNS: tuple[str, ...] = index_columns()


def _metadata_names(schema: pa.Schema) -> list[str]:
    if "metadata" not in schema.names or not pa.types.is_struct(schema.field("metadata").type):
        return []
    return [f.name for f in schema.field("metadata").type]


def stored_s2_levels(schema: pa.Schema) -> tuple[int, ...]:
    """The S2 levels (ascending) of a table's ``metadata.s2_token_l<level>`` fields; empty when it has none."""
    return tuple(sorted(int(m.group(1)) for name in _metadata_names(schema) if (m := _S2_FIELD.fullmatch(name))))


def stored_h3_resolution(schema: pa.Schema) -> int | None:
    """The resolution of a table's ``metadata.h3_<resolution>`` field, or None without one."""
    found = [int(m.group(1)) for name in _metadata_names(schema) if (m := _H3_FIELD.fullmatch(name))]
    return found[0] if found else None


def schema_of(schema: pa.Schema) -> pa.Schema:
    """The training schema for the S2 levels and H3 resolution a stored ``schema`` carries (defaults where none)."""
    resolution = stored_h3_resolution(schema)
    return training_data_schema(stored_s2_levels(schema) or DEFAULT_S2_LEVELS,
                                DEFAULT_H3_RESOLUTION if resolution is None else resolution)


def leaf_types(schema_or_type: pa.Schema | pa.StructType, prefix: str = "") -> dict[str, pa.DataType]:
    """{dotted path: type} of every column and nested struct field (structs included)."""
    out: dict[str, pa.DataType] = {}
    for field in schema_or_type:
        path = f"{prefix}{field.name}"
        out[path] = field.type
        if pa.types.is_struct(field.type):
            out.update(leaf_types(field.type, path + "."))
    return out


def schema_problems(schema: pa.Schema) -> list[str]:
    """Columns of the training schema (for the S2 levels / H3 resolution ``schema`` carries) that ``schema`` lacks
    or types differently (empty when fine)."""
    have = leaf_types(schema)
    problems = []
    for path, dtype in leaf_types(schema_of(schema)).items():
        if path not in have:
            problems.append(f"missing column {path}")
        elif not pa.types.is_struct(dtype) and have[path] != dtype:
            problems.append(f"column {path} is {have[path]}, expected {dtype}")
    return problems

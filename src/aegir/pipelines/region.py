"""Regional tiled inference (``aegir infer region``): a resumable S2 grid plan over a folder of tiles, run one
cell at a time through :mod:`aegir.dataflows.region_inference`.

Per cell: read the overlapping tiles, mosaic them on a common grid (read ahead in a worker thread), blend
overlapping-tile probabilities (model tiles of several cells share forward passes), write
``OUT/cells/<token>.tif`` (COG, uint8 probability × 255) and replace the cell's rows in the lakehouse table
``predicted_pv`` while marking it done (a transaction per ``commit_every`` cells). A cell whose read or prediction
fails is marked ``failed`` with the reason and the others go on; a cell without imagery is marked ``no_imagery``;
cells are marked ``running`` ``read_ahead`` + 1 at a time just before they are read, so a killed run leaves the
cells it had started (and at most ``read_ahead`` about to start) ``running`` (an interrupt still records the cells that finished). A re-run of the same inputs (same plan
id) skips done cells and finishes the rest.
At the end ``OUT/detections.parquet`` (GeoParquet) and ``OUT/detections.gpkg`` are rewritten from every
``predicted_pv`` row of the plan, and the plan's detections are merged across tile and cell borders into
installations (:mod:`aegir.dataflows.installations`: detections within ``gap_m`` metres form one, with area,
orientation and a DC-capacity estimate from the shipped USPVDB relation), which replace the plan's rows of the
lakehouse table ``installations`` and are written to ``OUT/installations.parquet`` / ``.gpkg``. Only a few cells'
windows are in memory at a time (about 2 × ``read_ahead`` + 4: read ahead, waiting for tiles, post-processed),
whatever the region's size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import shapely

from aegir.config import Settings
from aegir.dataflows import region_inference
from aegir.dataflows.installations import checked_gap_m
from aegir.pipelines import build_driver, region_engine, run_stage
from aegir.pipelines.plan import plan_grid
from aegir.store import capacity_files, ducklake, region_files
from aegir.training.predictor import D4_VIEWS, checked_margin_px

CELL_OUTPUTS = ("cell_probability_raster", "prediction_rows")
TODO_STATUSES = ("pending", "running", "failed")


NoImageryError = region_inference.NoImageryError  # the AOI, or a cell, holds no imagery from the tile folder


@dataclass
class RegionReport:
    """Outcome of one ``aegir infer region`` run; cell lists hold S2 tokens or {cell_token, reason}."""

    plan_id: str
    out_dir: str
    cells: int
    processed: list[str] = field(default_factory=list)
    skipped_done: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)  # found "running": an earlier run was killed in them
    failed: list[dict] = field(default_factory=list)
    no_imagery: list[dict] = field(default_factory=list)
    new_detections: int = 0
    detections: int = 0
    detections_parquet: str = ""
    detections_gpkg: str = ""
    installations: int = 0  # detections merged within gap_m metres: one per array group
    installations_parquet: str = ""
    installations_gpkg: str = ""
    gap_m: float = 0.0
    cell_rasters: list[str] = field(default_factory=list)
    tiles_skipped: list[dict] = field(default_factory=list)
    chips: int = 0
    seconds: float = 0.0

    @property
    def chips_per_s(self) -> float:
        """Model tiles (``tile_px``²) predicted per second of this run."""
        return self.chips / self.seconds if self.seconds else 0.0


class _CountingModel:
    """The model's image preparation and batch predictor (:func:`~aegir.training.predictor.image_predictor`,
    averaged over the dihedral test-time ``views``: (0,) is none), counting the tiles predicted (each tile once,
    whatever the views)."""

    def __init__(self, model: Any, views: tuple[int, ...] = (0,)) -> None:
        from aegir.training.predictor import image_predictor, tta_predictor

        self.model = model
        self.standardized, predict_tiles = image_predictor(model)
        self.predict_tiles, self.calls = tta_predictor(predict_tiles, views), 0
        self.data_version = getattr(model, "data_version", -1)
        self.dataset_uri = getattr(model, "dataset_uri", "")

    def predict_standardized(self, tiles):
        self.calls += len(tiles)
        return self.predict_tiles(tiles)


@contextlib.contextmanager
def _tile_reader(inputs: dict, tiles: list[region_files.TileRef], decode_workers: int) -> Iterator[None]:
    """``inputs["tile_reader"]`` from a :class:`~aegir.store.region_files.NamedTileDecoder` of ``decode_workers``
    processes while the block runs, when > 0 and any tile is a named PNG/BMP tile; else unchanged."""
    if decode_workers <= 0 or not any(t.named for t in tiles):
        yield
        return
    with region_files.NamedTileDecoder(decode_workers) as decoder:
        inputs["tile_reader"] = decoder.read_tile_window
        yield


def region_plan_id(tiles: list[region_files.TileRef], aoi: shapely.Geometry, plan_level: int,
                   checkpoint: str | Path, settings_key: tuple) -> str:
    """``region_l<level>_<hash>``: a digest of the tile files' paths, the AOI, the checkpoint (path, size, mtime)
    and the inference settings, so the same inputs resume the same plan and different ones never share cells
    (a damaged tile replaced under the same name keeps the plan: its failed cells are retried)."""
    ckpt = Path(checkpoint).resolve()
    stat = ckpt.stat()
    digest = hashlib.sha1()
    tile_paths = sorted(t.path if region_files.is_remote_source(t.path) else str(Path(t.path).absolute())
                        for t in tiles)
    for part in (*tile_paths, shapely.to_wkb(aoi, hex=True, output_dimension=2),
                 str(ckpt), stat.st_size, stat.st_mtime_ns, plan_level, *settings_key):
        digest.update(str(part).encode() + b"\0")
    return f"region_l{plan_level}_{digest.hexdigest()[:12]}"


def _region_aoi(aoi: str | Path | shapely.Geometry | None, tiles: list[region_files.TileRef]) -> shapely.Geometry:
    """The AOI (EPSG:4326): as given, read from a file / bbox, or the union of the tiles' footprints."""
    if aoi is None:
        return shapely.union_all([t.footprint for t in tiles])
    return aoi if isinstance(aoi, shapely.Geometry) else region_files.read_aoi(aoi)


def _load_model(checkpoint: str | Path, device: str | None, precision: str | None) -> Any:
    from aegir.training.inference_model import load_segmentation_model

    return load_segmentation_model(str(checkpoint), device=device, precision=precision)


def _index_tiles(settings: Settings, tiles_dir: str | Path | None, aoi: Any
                 ) -> tuple[list[region_files.TileRef], list[dict]]:
    """The region's tiles from ``tiles_dir``: a folder, glob, raster file, COG URL or STAC catalog
    (:func:`aegir.store.region_files.tile_sources`), or ``catalog:<dataset>`` (the lakehouse imagery catalog)."""
    if tiles_dir is None:
        given = f"the AOI {aoi} selects cells, but " if aoi is not None else ""
        raise ValueError(f"{given}region inference reads imagery from a source: pass --tiles (a folder, glob, "
                         "raster file, COG URL, STAC catalog or catalog:<dataset>)")
    source = str(tiles_dir)
    if source.startswith("catalog:"):
        from aegir.pipelines.imagery import list_imagery

        rows = list_imagery(settings, source.removeprefix("catalog:"))
        uris = [u for u in rows["uri"].to_pylist() if "#" not in u] if rows.num_rows else []
        if not uris:
            raise ValueError(f"--tiles {source}: the imagery catalog holds no readable image of that dataset")
        tiles, skipped = region_files.tile_index(uris)
    else:
        tiles, skipped = region_files.tile_index(tiles_dir)
    if not tiles:
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise ValueError(f"{tiles_dir}: no tile can be placed on the map ({reasons})")
    return tiles, skipped


def _check_imagery(settings: Settings, plan, plan_id: str, aoi: shapely.Geometry, aoi_text: str,
                   tiles: list[region_files.TileRef], tiles_dir: str | Path) -> None:
    """NoImageryError (after marking every cell ``no_imagery``) when no tile overlaps the AOI."""
    if any(shapely.intersection(t.footprint, aoi).area > 0 for t in tiles):
        return
    extent = shapely.union_all([t.footprint for t in tiles]).bounds
    reason = (f"the AOI {aoi_text} (lon/lat bounds {tuple(round(v, 5) for v in aoi.bounds)}) holds no imagery: "
              f"none of the {len(tiles)} tiles in {tiles_dir} (extent {tuple(round(v, 5) for v in extent)}) "
              "overlaps it")
    con = ducklake.connect(settings)
    try:
        ducklake.set_plan_status(con, settings, plan_id, "no_imagery", reason)
    finally:
        con.close()
    raise NoImageryError(f"{reason}; the {plan.num_rows} cells of plan {plan_id} are marked no_imagery")


@contextlib.contextmanager
def _without_hamilton_banner():
    """Drop the help banner Hamilton logs on every failed execute: a failed cell is expected and recorded."""
    from hamilton import driver

    def keep(record: logging.LogRecord) -> bool:
        return record.getMessage() != driver.SLACK_ERROR_MESSAGE

    logger = logging.getLogger(driver.__name__)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


class _CellRecorder:
    """The cells' outcomes, written to the lakehouse in batches of ``commit_every`` (one transaction each: rows
    of done cells + statuses), and to ``report``; :meth:`flush` writes what is left."""

    def __init__(self, con, settings: Settings, plan_id: str, report: RegionReport, commit_every: int) -> None:
        self.con, self.settings, self.plan_id, self.report = con, settings, plan_id, report
        self.commit_every = max(1, commit_every)
        self.done: dict[str, Any] = {}
        self.ended: dict[str, tuple[str, str]] = {}

    def add_done(self, token: str, rows, raster: Path) -> None:
        self.done[token] = rows
        self.report.processed.append(token)
        self.report.cell_rasters.append(str(raster))
        self._maybe_flush()

    def add_ended(self, token: str, exc: BaseException) -> None:
        if isinstance(exc, region_inference.NoImageryError):
            self.ended[token] = ("no_imagery", str(exc))
            self.report.no_imagery.append({"cell_token": token, "reason": str(exc)})
        else:
            reason = f"{type(exc).__name__}: {exc}"
            self.ended[token] = ("failed", reason)
            self.report.failed.append({"cell_token": token, "reason": reason})
        self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self.done) + len(self.ended) >= self.commit_every:
            self.flush()

    def flush(self) -> None:
        if self.done or self.ended:
            self.report.new_detections += ducklake.record_cells(self.con, self.settings, self.plan_id, self.done,
                                                                self.ended)
            self.done, self.ended = {}, {}


def _marked_running(con, settings: Settings, plan_id: str, tokens: list[str], chunk: int) -> Iterator[str]:
    """``tokens`` in order; each chunk is marked ``running`` (one statement) just before its first cell is read."""
    for start in range(0, len(tokens), max(1, chunk)):
        part = tokens[start : start + max(1, chunk)]
        ducklake.mark_cells_running(con, settings, plan_id, part)
        yield from part


def _run_cells(con, settings: Settings, plan_id: str, todo: list[str], dag, inputs: dict, out: Path,
               report: RegionReport, engine: dict[str, int], on_cell: Callable[[], None]) -> None:
    """Every ``todo`` cell through the engine (:mod:`aegir.pipelines.region_engine`): read ahead, batched
    across cells, blended; then detections + COG per cell and batched lakehouse writes."""
    drivers = threading.local()  # each reader thread its own Hamilton driver
    model = inputs["segmentation_model"]
    tree = region_inference.tile_tree(inputs["tile_index"])  # once per region

    def read(token: str) -> region_engine.CellWork:
        if not hasattr(drivers, "dag"):
            drivers.dag = build_driver([region_inference])
        with _without_hamilton_banner():
            got = drivers.dag.execute(["cell_mosaic", "mosaic_grid"], inputs={**inputs, "cell_token": token},
                                   overrides={"tile_tree": tree})
        mosaic = got["cell_mosaic"]  # prepared here, in the reader thread (per_image models: the cell's statistics)
        return region_engine.CellWork(token, got, model.standardized(mosaic.pixels, mosaic.valid), mosaic.valid)

    recorder = _CellRecorder(con, settings, plan_id, report, engine["commit_every"])
    reads = region_engine.read_ahead(_marked_running(con, settings, plan_id, todo, engine["read_ahead"] + 1), read,
                                     engine["read_workers"], engine["read_ahead"])
    try:
        for cell in region_engine.blended_cells(reads, model.predict_standardized,
                                                inputs["tile_px"], inputs["overlap_px"], engine["batch_size"],
                                                engine["read_ahead"] + 2, inputs["margin_px"]):
            try:
                if cell.error is not None:
                    raise cell.error
                with _without_hamilton_banner():
                    result = dag.execute(list(CELL_OUTPUTS), overrides={**cell.read,
                                                                        "cell_probabilities": cell.probabilities},
                                         inputs={**inputs, "cell_token": cell.token,
                                                 "predicted_at": dt.datetime.now(dt.timezone.utc)})
                raster = region_files.write_probability_cog(result["cell_probability_raster"],
                                                            out / "cells" / f"{cell.token}.tif")
            except Exception as exc:  # a failing read / prediction must not stop the region: the plan keeps the reason
                recorder.add_ended(cell.token, exc)
            else:
                recorder.add_done(cell.token, result["prediction_rows"], raster)
            on_cell()
    finally:
        recorder.flush()  # the finished cells' outcomes, also when interrupted


def plan_installations(rows: pa.Table, plan_id: str, gap_m: float = 5.0,
                       capacity_params: dict | None = None) -> pa.Table:
    """The ``installations`` rows of a plan's ``predicted_pv`` rows; ``capacity_params`` default: the shipped
    relation (``aegir/defaults/capacity_dc.toml``)."""
    inputs = {"plan_predictions": rows, "plan_id": plan_id, "gap_m": float(gap_m),
              "capacity_params": capacity_params or capacity_files.read_capacity_params()}
    return run_stage("installations", ["installation_rows"], inputs)["installation_rows"]


def infer_region(
    settings: Settings,
    checkpoint: str | Path,
    out_dir: str | Path,
    tiles_dir: str | Path | None = None,
    aoi: str | Path | shapely.Geometry | None = None,
    plan_level: int = 14,
    tile_px: int = 1024,
    overlap_px: int = 288,
    pv_threshold: float = 0.5,
    context_px: int = 128,
    min_detection_px: int = 4,
    progress: Callable[[int, int], None] | None = None,
    model: Any = None,
    device: str | None = None,
    cell_boosts: dict[str, float] | None = None,
    gap_m: float = 5.0,
    batch_size: int | None = None,
    read_workers: int = 1,
    decode_workers: int = 0,
    read_ahead: int = 2,
    commit_every: int = 8,
    tta: bool = False,
    precision: str | None = "auto",
    margin_px: int | None = None,
) -> RegionReport:
    """PV probabilities and detections for the tiles of ``tiles_dir`` (all of them, or the S2 cells of level
    ``plan_level`` covering ``aoi``: a vector/WKT file, a bbox string or a shapely geometry, EPSG:4326).

    ``progress(done, total)`` is called per cell. ``model`` overrides loading ``checkpoint`` (the checkpoint is
    still the provenance). ``cell_boosts`` (S2 token at ``plan_level`` → boost > 0, the
    find-more-like-this hook) are processed before every other cell. Detections at most ``gap_m`` metres apart
    form one installation.

    Engine (:mod:`aegir.pipelines.region_engine`): ``batch_size`` model tiles per forward pass across cells
    (None: :func:`aegir.pipelines.region_engine.forward_batch_size`),
    ``read_workers`` threads reading up to ``read_ahead`` cells ahead (named PNG/BMP tiles decoded in
    ``decode_workers`` spawned processes when > 0), outcomes written every ``commit_every`` cells. Tiling:
    ``tile_px`` tiles overlapping by ``overlap_px``, the outer ``margin_px`` of each inner tile edge left out of
    the blend (a CNN's truncated context; None: :func:`aegir.training.predictor.default_margin_px`); ``tta``:
    every tile averaged over its eight dihedral views (D4); ``precision``: the network's autocast precision
    (``auto``: bf16 + channels_last on CUDA, fp32 on the CPU; like ``device``, an execution detail, not part of
    the plan id).

    Raises ValueError / FileNotFoundError for unusable inputs, :class:`NoImageryError` when no tile overlaps the
    AOI.
    """
    started = time.perf_counter()
    checked_gap_m(gap_m)  # before any cell runs
    region_engine.checked_batch_size(batch_size)  # likewise
    margin_px = checked_margin_px(overlap_px, margin_px)
    capacity_params = capacity_files.read_capacity_params()
    tiles, tiles_skipped = _index_tiles(settings, tiles_dir, aoi)
    region = _region_aoi(aoi, tiles)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    plan_id = region_plan_id(tiles, region, plan_level, checkpoint,
                             (tile_px, overlap_px, pv_threshold, context_px, min_detection_px)
                             + (("margin", margin_px) if margin_px else ())
                             + (("tta",) if tta else ()))
    plan = plan_grid(settings, plan_id, region, plan_level=plan_level, context_level=max(plan_level - 3, 0),
                     cell_boosts=cell_boosts)
    _check_imagery(settings, plan, plan_id, region, str(aoi), tiles, tiles_dir)
    out = Path(out_dir)
    report = RegionReport(plan_id, str(out), plan.num_rows, tiles_skipped=tiles_skipped, gap_m=float(gap_m))
    counting = _CountingModel(model if model is not None else _load_model(checkpoint, device, precision),
                              D4_VIEWS if tta else (0,))
    inputs = {"tile_index": tiles, "tile_reader": region_files.read_tile_window, "segmentation_model": counting,
              "model_checkpoint": str(Path(checkpoint).resolve()), "plan_id": plan_id, "tile_px": tile_px,
              "overlap_px": overlap_px, "margin_px": margin_px, "pv_threshold": pv_threshold, "context_px": context_px,
              "min_detection_px": min_detection_px}
    dag = build_driver([region_inference])
    rows_now = plan.to_pylist()
    report.resumed = [r["cell_token"] for r in rows_now if r["status"] == "running"]
    report.skipped_done = [r["cell_token"] for r in rows_now if r["status"] == "done"]
    todo = [r["cell_token"] for r in rows_now if r["status"] in TODO_STATUSES]
    finished = [plan.num_rows - len(todo)]

    def on_cell() -> None:
        finished[0] += 1
        if progress:
            progress(finished[0], plan.num_rows)

    engine = {"batch_size": region_engine.forward_batch_size(batch_size, counting.model),
              "read_workers": read_workers, "read_ahead": read_ahead, "commit_every": commit_every}
    con = ducklake.connect(settings)
    try:
        if progress and finished[0]:
            progress(finished[0], plan.num_rows)
        with _tile_reader(inputs, tiles, decode_workers if todo else 0):
            _run_cells(con, settings, plan_id, todo, dag, inputs, out, report, engine, on_cell)
        rows = ducklake.read_predictions(con, settings, plan_id)
        parquet, gpkg = region_files.write_detections(rows, out)  # first: an installations failure keeps them
        report.detections, report.detections_parquet, report.detections_gpkg = rows.num_rows, str(parquet), str(gpkg)
        installations = plan_installations(rows, plan_id, gap_m, capacity_params)
        ducklake.replace_plan_installations(con, settings, plan_id, installations)
    finally:
        con.close()
    parquet, gpkg = region_files.write_installations(installations, out)
    report.installations, report.installations_parquet, report.installations_gpkg = (installations.num_rows,
                                                                                      str(parquet), str(gpkg))
    report.chips, report.seconds = counting.calls, time.perf_counter() - started
    return report

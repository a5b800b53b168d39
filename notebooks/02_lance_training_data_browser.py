# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Browsing the LanceDB `training_data` table
#
# Every training sample of the flywheel is one row of one LanceDB table: the chip bytes (`vhr_image_chip`,
# optional `msi_image_chip`), the masks (`truth_mask`: a dataset's ground truth; `generated_mask`: the Mask Factory's), the prompt geometry and a `metadata` struct (dataset,
# S2 tokens at levels 10 / 13 / 17, H3, CRS + transform, mask source, provenance). Every write is a commit, so
# every training run can pin — and later re-read — exactly the rows it saw.
#
# This notebook builds a small table in its own workspace from real data, then does what an engineer does
# before training on it:
#
# 1. **builds** it in three commits: the 60 Jiang PV01 tiles with ground truth; the 45 Austin tiles without
#    masks (`aegir dataset build`); offline Mask Factory masks for 8 Jiang tiles upserted over their ground truth
#    (`aegir masks generate --lance`),
# 2. **filters** by dataset, by S2 cell (a BTREE index on the nested token field serves it) and by provenance,
# 3. looks at **thumbnails** (`aegir quicklook`: prompt outlined | mask overlay),
# 4. lists the **versions** and **time-travels** to the version before the Mask Factory overwrote 8 masks,
# 5. puts the chip footprints and their S2 cells on a **map** (folium, pan and zoom; a PNG beside it).

# %%
import json
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets

import folium
import geopandas as gpd
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import shapely
from IPython.display import Image, display

from aegir.config import load_settings
from aegir.pipelines.dataset import build_dataset_from_images, dataset_info
from aegir.pipelines.masks import generate_masks
from aegir.pipelines.quicklook import quicklook_training_data
from aegir.store import lance_io, mask_files
from aegir.store.chip_codec import decode_chip
from aegir.utils import s2geometry
from aegir.utils.notebook import notebook_workspace, save_results, show_figure

NAME = "02_lance_training_data_browser"
WORK = notebook_workspace(NAME)  # $NOTEBOOK_WORKDIR/<name>, else ./_work/<name>

base = load_settings()  # honours AEGIR_SAMPLE_DATA_DIR; the stores go into the workspace
settings = base.replace(lancedb_root=str(WORK / "lancedb"),
                        ducklake_catalog=str(WORK / "ducklake" / "catalog.ducklake"),
                        ducklake_data_path=str(WORK / "ducklake" / "files") + "/")
DATA = Path(settings.sample_data_dir)
JIANG = DATA / "vhr" / "jiang_pv01"
AUSTIN = DATA / "vhr" / "nrel_panel_segmentation" / "sol-searcher_data_examples"
URI = str(WORK / "lancedb" / "training_data")
RESULTS: dict = {}
STARTED = time.perf_counter()


def show(figure, name: str) -> None:
    """Save a figure as ``WORK/<name>.png`` and display that PNG (a static result, no browser needed)."""
    show_figure(figure, WORK / f"{name}.png")


print(f"python {sys.executable}\nworkspace {WORK}\nshared data {DATA}")

# %% [markdown]
# ## Build the table (three commits)

# %%
steps = []
report = build_dataset_from_images(settings, JIANG / "images", JIANG / "masks", URI, "jiang_pv01")
steps.append({"step": "Jiang PV01 + ground truth", "inserted": report.inserted, "version": report.version,
              "skipped": len(report.skipped)})
report = build_dataset_from_images(settings, AUSTIN, None, URI, "austin_sol_searcher")
steps.append({"step": "Austin tiles, no masks", "inserted": report.inserted, "version": report.version,
              "skipped": len(report.skipped)})

# Mask Factory on 8 Jiang tiles, prompted by one box per ground-truth component, written into the same rows
picked = WORK / "mf_images"
picked.mkdir()
for path in sorted((JIANG / "images").glob("*.bmp"))[::8][:8]:
    (picked / path.name).symlink_to(path)
mask_files.write_component_box_prompts(picked, JIANG / "masks", WORK / "mf_prompts.csv")
mf = generate_masks(picked, WORK / "mf_prompts.csv", "offline", WORK / "mf_masks", settings=settings,
                              lance_uri=URI, dataset="jiang_pv01")
steps.append({"step": "Mask Factory (offline) over 8 Jiang rows", "inserted": mf.lance["inserted"],
              "updated": mf.lance["updated"], "version": mf.lance["version"], "skipped": 0})
pd.DataFrame(steps)

# %% [markdown]
# `aegir dataset info`: rows, versions, bytes, S2 coverage and class balance. The Austin rows have no mask
# (they are region tiles waiting for inference, not training samples): training selects `generated_mask IS NOT
# NULL`.

# %%
table = lance_io.open_training_table(URI, settings.lancedb_root, create=False)
info = dataset_info(settings, URI)
RESULTS["info"] = {k: info[k] for k in ("rows", "version", "versions", "rows_with_mask", "rows_without_mask",
                                        "datasets", "s2_l13_cells")}
pd.Series(info).to_frame("value")

# %% [markdown]
# ## Filters
#
# `lance_io.filter_rows` builds the SQL from `{field: value}` (values quoted by the store, never pasted in):
# a value is `=`, a list is `IN`, `("prefix", s)` is `starts_with`. Fields are top-level columns or
# `metadata` fields, nested ones included (`provenance.backend`).

# %%
COLUMNS = ["uuid", "sample_id", "dataset", "s2_token_l10", "s2_token_l13", "mask_source", "pv_fraction", "gsd_m"]


def frame(where: dict, limit: int | None = None) -> pd.DataFrame:
    rows = lance_io.filter_rows(table, where, columns=COLUMNS, limit=limit).to_pandas()
    return rows.rename(columns=lambda c: c.split(".")[-1])


by_dataset = {name: len(frame({"dataset": name})) for name in ("jiang_pv01", "austin_sol_searcher")}
print("rows by dataset:", by_dataset)
jiang_rows = frame({"dataset": "jiang_pv01"})
cells = jiang_rows.s2_token_l13.value_counts()
print("Jiang rows per S2 level-13 cell (~1 km):")
display(cells.to_frame("rows"))

# %% [markdown]
# **By S2 cell.** Level-13 tokens are indexed (BTREE on `metadata.s2_token_l13`); the query plan shows the
# index being used. Coarser: the level-10 parent of that cell (~10 km; also indexed). Any other level ≤ 17
# is a cell-id range over the level-17 token: `--s2-prefix` of `aegir prompts export` / the `filter_s2_cell`
# of a training config.

# %%
busiest = cells.index[0]
in_cell = frame({"s2_token_l13": busiest})
clause = lance_io.build_where_clause({"s2_token_l13": busiest}, table.schema)
print(f"cell {busiest}: {len(in_cell)} rows; WHERE {clause}")
plan = table.search().where(clause).select(["uuid"]).explain_plan()
print("\n".join(line for line in plan.splitlines() if "Index" in line or "Scalar" in line) or plan)

l10 = in_cell.s2_token_l10.iloc[0]  # every row carries its level-10 / 13 / 17 tokens
in_l10 = frame({"s2_token_l10": l10})
print(f"its level-10 parent {l10}: {len(in_l10)} rows, {in_l10.s2_token_l13.nunique()} level-13 cells")
RESULTS["filters"] = {"by_dataset": by_dataset, "busiest_l13": busiest, "rows_in_busiest_l13": len(in_cell),
                      "rows_in_parent_l10": len(in_l10)}

# %% [markdown]
# **By provenance.** Which rows carry a mask the Mask Factory made, with which backend and version — the
# filter a training config uses (`filter_mask_source`, `filter_provenance_backend`) to train with or without
# generated labels.

# %%
by_source = frame({})["mask_source"].fillna("none (no mask)").value_counts()
display(by_source.to_frame("rows"))
generated = lance_io.filter_rows(table, {"provenance.backend": "offline"},
                                 columns=["sample_id", "mask_source", "provenance"]).to_pandas()
generated = generated.rename(columns=lambda c: c.split(".")[-1])
generated["backend_version"] = generated["provenance"].map(lambda p: p["backend_version"])
generated["created_at"] = generated["provenance"].map(lambda p: p["created_at"])
generated["grabcut_params"] = generated["provenance"].map(
    lambda p: {k: v for k, v in json.loads(p["params_json"])["backend_params"].items() if k in ("iterations",
                                                                                             "morph_px")})
RESULTS["provenance"] = {"mask_sources": by_source.to_dict(), "offline_rows": len(generated)}
generated.drop(columns="provenance")

# %% [markdown]
# ## Thumbnails
#
# `aegir quicklook` renders each row as *chip with its prompt outlined (yellow) | mask overlay (magenta)*, plus
# a contact sheet. First the Mask Factory rows, then Austin rows (no mask yet: the right half is the chip).

# %%
sheet = quicklook_training_data(settings, URI, WORK / "quicklook_mf", {"mask_source": "mask_factory:offline"},
                                limit=8)
display(Image(filename=sheet["contact_sheet"]))
sheet = quicklook_training_data(settings, URI, WORK / "quicklook_austin", {"dataset": "austin_sol_searcher"},
                                limit=4)
display(Image(filename=sheet["contact_sheet"]))

# %% [markdown]
# ## Versions and time travel
#
# Each build step is a commit, and so is each BTREE index build after it (hence more versions than steps;
# the table below marks the commit of each step). `lance_io.read_version` reads the whole table as of
# any version without moving the table; here: the 8 rows the Mask Factory rewrote, as they were before (ground
# truth only) and as they are now (an offline mask in `generated_mask`, the truth still in `truth_mask`), and how
# far apart the two masks are.

# %%
versions = pd.DataFrame(lance_io.table_versions(table))
versions["commit"] = ""
for step in steps:  # the commit that wrote the step's rows
    versions.loc[versions.version == step["version"], "commit"] = step["step"]
display(versions[(versions.commit != "") | (versions.version == 1)])
before_version = steps[1]["version"]
before = lance_io.read_version(table, before_version).to_pylist()
now = table.to_lance().to_table().to_pylist()
by_uuid_before = {r["uuid"]: r for r in before}


def mask_of(row: dict) -> np.ndarray:
    """The row's newest mask: the generated one where it has one, else its ground truth (kept in `truth_mask`)."""
    meta = row["metadata"]
    stored = row["generated_mask"] or row.get("truth_mask")
    return decode_chip(stored, meta["mask_encoding"], meta["mask_shape"], "uint8") > 0


changed = [r for r in now if r["metadata"]["mask_source"] == "mask_factory:offline"]
travel = []
for row in changed:
    old = by_uuid_before[row["uuid"]]
    a, b = mask_of(old), mask_of(row)
    travel.append({"sample_id": row["metadata"]["sample_id"],
                   f"source@v{before_version}": old["metadata"]["mask_source"],
                   "source@now": row["metadata"]["mask_source"],
                   "pv_fraction before": old["metadata"]["pv_fraction"], "now": row["metadata"]["pv_fraction"],
                   "IoU(now, before)": (a & b).sum() / max((a | b).sum(), 1)})
travel = pd.DataFrame(travel)
RESULTS["time_travel"] = {"before_version": before_version, "now_version": int(table.version),
                          "rows_before": len(before), "rows_now": len(now), "changed_rows": len(travel),
                          "mean_iou_now_vs_before": float(travel["IoU(now, before)"].mean())}
travel.round(3)

# %%
from aegir.pipelines.quicklook import row_panel  # noqa: E402

figure, axes = plt.subplots(2, 3, figsize=(10, 4.4))
for k, row in enumerate(changed[:3]):
    axes[0, k].imshow(row_panel(by_uuid_before[row["uuid"]]))
    axes[0, k].set_title(f"v{before_version}: ground truth", fontsize=8)
    axes[1, k].imshow(row_panel(row))
    axes[1, k].set_title(f"v{table.version}: mask_factory:offline", fontsize=8)
for ax in axes.ravel():
    ax.axis("off")
figure.suptitle("the same rows, two versions of the table", fontsize=10)
show(figure, "time_travel")

# %% [markdown]
# ## On a map
#
# Footprints come from `prompt_geometry` (WKB, EPSG:4326; for a folder build the prompt is the tile footprint).
# The Jiang footprints are approximate: their file names keep the centre to 1e-4° (~11 m). The map is a real
# folium / Leaflet widget (pan, zoom, click a chip for its metadata; the OpenStreetMap background needs a
# network, the vectors do not); the PNG below it shows the same layers statically.

# %%
rows = table.to_lance().to_table(columns={"uuid": "uuid", "geometry": "prompt_geometry",
                                          "sample_id": "metadata.sample_id", "dataset": "metadata.dataset",
                                          "s2_l13": "metadata.s2_token_l13",
                                          "mask_source": "metadata.mask_source",
                                          "pv_fraction": "metadata.pv_fraction"}).to_pandas()
chips = gpd.GeoDataFrame(rows.drop(columns="geometry"), geometry=shapely.from_wkb(rows["geometry"]),
                         crs="EPSG:4326")
chips["mask_source"] = chips["mask_source"].fillna("none")
cells13 = gpd.GeoDataFrame({"s2_l13": sorted(chips.s2_l13.unique())},
                           geometry=[s2geometry.s2_cell_polygon(t) for t in sorted(chips.s2_l13.unique())],
                           crs="EPSG:4326")
COLOURS = {"ground_truth": "#1f77b4", "mask_factory:offline": "#d62728", "none": "#7f7f7f"}


def chip_map(region: gpd.GeoDataFrame) -> folium.Map:
    fmap = folium.Map(tiles="OpenStreetMap", control_scale=True)
    cells_here = cells13[cells13.s2_l13.isin(region.s2_l13)]
    folium.GeoJson(cells_here, name="S2 level-13 cells", tooltip=folium.GeoJsonTooltip(["s2_l13"]),
                   style_function=lambda _: {"color": "black", "weight": 1, "fill": False, "dashArray": "4"}
                   ).add_to(fmap)
    for source, group in region.groupby("mask_source"):
        folium.GeoJson(group, name=f"chips: {source}", style_function=lambda _, c=COLOURS[source]: {
            "color": c, "weight": 2, "fillOpacity": 0.3},
            popup=folium.GeoJsonPopup(["sample_id", "dataset", "s2_l13", "mask_source", "pv_fraction"])
        ).add_to(fmap)
    folium.LayerControl().add_to(fmap)
    minx, miny, maxx, maxy = region.total_bounds
    fmap.fit_bounds([[miny, minx], [maxy, maxx]])
    return fmap


jiang_map = chip_map(chips[chips.dataset == "jiang_pv01"])
jiang_map.save(WORK / "jiang_chips_map.html")
jiang_map

# %%
austin_map = chip_map(chips[chips.dataset == "austin_sol_searcher"])
austin_map.save(WORK / "austin_chips_map.html")
austin_map

# %% [markdown]
# Static fallback of both maps (no browser needed):

# %%
figure, axes = plt.subplots(1, 2, figsize=(11, 5))
for ax, dataset in zip(axes, ("jiang_pv01", "austin_sol_searcher")):
    region = chips[chips.dataset == dataset]
    cells13[cells13.s2_l13.isin(region.s2_l13)].boundary.plot(ax=ax, color="black", linewidth=0.6,
                                                               linestyle="--")
    for source, group in region.groupby("mask_source"):
        group.plot(ax=ax, color=COLOURS[source], alpha=0.4, edgecolor=COLOURS[source])
        centres = group.geometry.to_crs(3857).centroid.to_crs(4326)  # 25 m Jiang chips are specks here: mark them
        ax.scatter(centres.x, centres.y, s=12, color=COLOURS[source], label=f"{source} ({len(group)})")
    minx, miny, maxx, maxy = region.total_bounds
    pad = max(maxx - minx, maxy - miny) * 0.1
    ax.set(xlim=(minx - pad, maxx + pad), ylim=(miny - pad, maxy + pad), xlabel="lon", ylabel="lat",
           title=f"{dataset}: {len(region)} chips, {region.s2_l13.nunique()} S2 l13 cells")
    ax.ticklabel_format(useOffset=False)
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize=8, loc="lower right")
show(figure, "chip_footprints")
RESULTS["map"] = {"chips": len(chips), "l13_cells": len(cells13)}

# %%
RESULTS["seconds"] = round(time.perf_counter() - STARTED, 1)
save_results(RESULTS, WORK)
print(json.dumps(RESULTS, indent=1, default=str))

"""The real label sets shipped beside the project (``<sample_data_dir>/labels``), with their expected row counts.

Paths are relative to ``Settings.sample_data_dir`` (default ``../shared/data``). Attribution and licences:
``../shared/data/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SampleLabelSet:
    """One shared label file: the dataset name it imports as, its path, its row count, its DOI if any."""

    dataset: str
    relative_path: str
    rows: int
    doi: str | None = None

    def path(self, sample_data_dir: Path) -> Path:
        return Path(sample_data_dir) / self.relative_path


SAMPLE_LABEL_SETS: tuple[SampleLabelSet, ...] = (
    SampleLabelSet("india_solar_farms", "labels/india_solar_farms_2021/solar_farms_india_2021_merged_simplified.geojson",
                   1363, "10.1038/s41597-022-01499-9"),
    SampleLabelSet("osm_germany", "labels/osm_pv_germany_austria/germany_photovoltaic.shp", 4458),
    SampleLabelSet("osm_austria", "labels/osm_pv_germany_austria/photovoltaic.shp", 2130),
    SampleLabelSet("uspvdb", "labels/uspvdb/uspvdb_v3_0_20250430.csv", 5712, "10.5066/P9IA3TUS"),
    SampleLabelSet("ornl_boston", "labels/ornl_rooftop_panels/boston/panels_man_bos/panels_man_bos.shp", 782),
    SampleLabelSet("ornl_dc", "labels/ornl_rooftop_panels/dc/panels_man_dc/panels_man_dc.shp", 1013),
)


def sample_label_set(dataset: str) -> SampleLabelSet:
    """The shared label set named ``dataset``."""
    for item in SAMPLE_LABEL_SETS:
        if item.dataset == dataset:
            return item
    raise KeyError(f"no shared label set {dataset!r}; known: {', '.join(s.dataset for s in SAMPLE_LABEL_SETS)}")


AUSTIN_TILES = "vhr/nrel_panel_segmentation/sol-searcher_data_examples"  # 45 contiguous Austin tiles, lat_lon.png


def link_tile_block(tiles_dir: Path, dest: Path, rows: int, cols: int) -> Path:
    """``dest``: a new folder of links to the ``rows`` × ``cols`` block of neighbouring tiles at the south-west
    corner of ``tiles_dir`` (tiles named ``<lat>_<lon>.png``, as the Austin set). ValueError when it does not fit."""
    names = sorted(p.name for p in Path(tiles_dir).glob("*.png"))
    lats = sorted({n.split("_")[0] for n in names}, key=float)
    lons = sorted({n.split("_")[1].removesuffix(".png") for n in names}, key=float)
    if rows > len(lats) or cols > len(lons):
        raise ValueError(f"{tiles_dir} is {len(lons)}×{len(lats)} tiles; a {cols}×{rows} block does not fit")
    dest.mkdir(parents=True)
    for lat in lats[:rows]:
        for lon in lons[:cols]:
            (dest / f"{lat}_{lon}.png").symlink_to(Path(tiles_dir) / f"{lat}_{lon}.png")
    return dest

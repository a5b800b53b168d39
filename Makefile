# The two set-up commands of the README: `make run` (main job on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
SHARED_DATA ?= ../shared/data
JIANG := $(SHARED_DATA)/vhr/jiang_pv01
NREL := $(SHARED_DATA)/vhr/nrel_panel_segmentation
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser postgres run test bench clean-data

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel; an unpinned torch would pull several GB of CUDA packages.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,yolo]'
	# ultralytics without its deps: it requires opencv-python, which would shadow opencv-python-headless (see pyproject).
	$(BIN)/pip install --quiet --no-deps ultralytics==8.4.190
	touch $(STAMP)

install: $(STAMP)

# Main job on the embedded defaults: local DuckLake under ./data/ducklake, LanceDB under ./data/lancedb.
run: install
	$(BIN)/aegir labels import-samples
	$(BIN)/aegir labels list
	$(BIN)/aegir prompts export --dataset ornl_boston --dataset ornl_dc --out data/prompts/ornl_rooftops.parquet
	# Jiang PV01 ground truth as the label sets teams really have: panel polygons, one box / one point per array
	$(BIN)/aegir labels from-masks --images $(JIANG)/images --masks $(JIANG)/masks --out data/labels/jiang_pv01 --name jiang_pv01
	$(BIN)/aegir labels import data/labels/jiang_pv01/jiang_pv01_polygons.geojson --dataset jiang_pv01_polygons
	$(BIN)/aegir labels import data/labels/jiang_pv01/jiang_pv01_boxes.geojson --dataset jiang_pv01_boxes
	$(BIN)/aegir labels import data/labels/jiang_pv01/jiang_pv01_points.geojson --dataset jiang_pv01_points
	# the imagery catalog: Jiang (with its pixel truth), the Austin tiles, the NREL tiles (no georeference: pixel grid)
	$(BIN)/aegir imagery register $(JIANG)/images --dataset jiang_pv01 --truth-masks $(JIANG)/masks
	$(BIN)/aegir imagery register $(NREL)/sol-searcher_data_examples --dataset austin
	$(BIN)/aegir imagery register $(NREL)/sample_data_set/images --dataset nrel --allow-pixel-grid
	$(BIN)/aegir prompts export --with-imagery --dataset jiang_pv01_polygons --out data/prompts/jiang_pv01_polygons_on_imagery.parquet
	# training_data from the lakehouse: polygon labels → offline Mask Factory masks, truth kept beside, lineage per row
	$(BIN)/aegir dataset build --from-lakehouse --dataset jiang_pv01_polygons --imagery jiang_pv01 --whole-images --backend offline
	$(BIN)/aegir dataset info
	$(BIN)/aegir dataset export-masks --out data/exported_masks/jiang_pv01_polygons
	# the flywheel (shipped defaults: aegir/defaults/flywheel.toml): round 0 + 3 rounds, its own training_data
	AEGIR_LANCEDB_ROOT=data/flywheel/lancedb $(BIN)/aegir flywheel --out data/flywheel

# Debian's chromium + chromium-driver drive the `aegir browse` end-to-end test (installed with apt when run as root).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: install Debian's chromium and chromium-driver for the browser test (needs root)"; fi

# Debian's postgresql: the DuckLake catalog server of tests/test_production_stack.py (run there as the unprivileged
# `postgres` user in a temporary directory, on a free loopback port; the package's own cluster is not used).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "note: install Debian's postgresql for the production-stack test (needs root)"; fi

# lint-imports checks the layer contracts of pyproject.toml ([tool.importlinter]) before the suite runs.
test: install browser postgres
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/loader.py

clean-data:
	rm -rf data/ducklake data/lancedb data/prompts data/labels data/exported_masks

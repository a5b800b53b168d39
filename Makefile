# The two set-up commands of the README: `make run` (main job on the embedded defaults) and `make test`.
PYTHON ?= python3
VENV ?= .venv
SHARED_DATA ?= ../shared/data
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser run test bench clean-data

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
	$(BIN)/aegir dataset build --images $(SHARED_DATA)/vhr/jiang_pv01/images --masks $(SHARED_DATA)/vhr/jiang_pv01/masks
	$(BIN)/aegir dataset info
	$(BIN)/aegir flywheel --rounds 2 --out data/flywheel

# Debian's chromium + chromium-driver drive the `aegir browse` end-to-end test (installed with apt when run as root).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: install Debian's chromium and chromium-driver for the browser test (needs root)"; fi

# lint-imports checks the layer contracts of pyproject.toml ([tool.importlinter]) before the suite runs.
test: install browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/loader.py

clean-data:
	rm -rf data/ducklake data/lancedb data/prompts

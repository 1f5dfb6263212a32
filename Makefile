# duquant-packs: the user's entry point. `make packs` and `make test` set up .venv themselves.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= llm_w4a8
CKPT ?=
JOBS ?=
OUT ?= artifacts
DEV_TORCH := 2.13.0
TARGETS ?=
# make gpu-check GPU_PYTHON=/path/to/python: an environment that has a CUDA torch already
# (the project is installed into it without touching its torch).
GPU_PYTHON ?=
DEMO_DIR := $(OUT)/demo
FULL_DIR := $(OUT)/demo-full
# One BLAS/OpenMP thread per process and no OpenMP busy-waiting: on 2 cores the
# defaults make small matmuls many times slower under load.
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: help install packs verify test test-compat gpu-check constraints lint format bench bench-full fuzz mutants full-checkpoint clean

help:
	@echo "make packs [CONFIG=llm_w4a8] [CKPT=path] [JOBS=n]   build + verify a bundle (demo checkpoint when no CKPT)"
	@echo "make test                                           the test suite (CI runs this)"
	@echo "make test-compat [TARGETS=openpi]                   the runtime's tests on openpi's / LeRobot's torch + transformers"
	@echo "make gpu-check [GPU_PYTHON=python]                  everything that needs CUDA, <= 5 min on one GPU (one line and exit 0 without)"
	@echo "make constraints                                    re-pin the dev set (constraints.txt) from a fresh resolve"
	@echo "make lint | format | verify BUNDLE=... | bench | bench-full | fuzz | mutants | full-checkpoint | clean"

# Every version comes from constraints.txt (torch: the CPU wheel 2.13.0); pyproject.toml keeps
# the ranges users install from. The check fails when .venv differs from the pins.
$(STAMP): pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m pip check
	$(BIN)/python tools/pins.py check constraints.txt
	touch $@

install: $(STAMP)

packs: $(STAMP)
	@set -euo pipefail; \
	ckpt="$(CKPT)"; \
	if [ -z "$$ckpt" ]; then ckpt=$$($(BIN)/duquant-packs demo-checkpoint --out $(DEMO_DIR)); echo "demo checkpoint: $$ckpt"; fi; \
	bundle=$$($(BIN)/duquant-packs build --config $(CONFIG) --checkpoint "$$ckpt" --out $(OUT) $(if $(JOBS),--jobs $(JOBS)) | tail -n 1); \
	$(BIN)/duquant-packs verify "$$bundle" --config $(CONFIG) --checkpoint "$$ckpt"; \
	echo "$$bundle"

verify: $(STAMP)
	@test -n "$(BUNDLE)" || { echo "usage: make verify BUNDLE=artifacts/<cfg>/<cfg>-<fp12>.h5 [CONFIG=...] [CKPT=...]"; exit 2; }
	$(BIN)/duquant-packs verify "$(BUNDLE)" $(if $(filter command line,$(origin CONFIG)),--config $(CONFIG)) $(if $(CKPT),--checkpoint $(CKPT))

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmarks print tables and write artifacts/bench/*.json; ratios are measured side by side.
# bench: demo size (~10 min on 2 cores); bench-full: full pi0.5 size (~25 min, 6.7 GB checkpoint).
bench: $(STAMP)
	@set -euo pipefail; \
	ckpt=$$($(BIN)/duquant-packs demo-checkpoint --out $(DEMO_DIR)); \
	bundle=$$($(BIN)/duquant-packs build --config full_w4a8 --checkpoint "$$ckpt" --out $(OUT) -q | tail -n 1); \
	$(BIN)/python bench/trained.py --out $(OUT)/bench/trained.json; \
	$(BIN)/python bench/quality.py --rows 128 --out $(OUT)/bench/quality.json; \
	$(BIN)/python bench/component_error.py --config full_w4a8 --checkpoint $(DEMO_DIR) --out $(OUT); \
	$(BIN)/python bench/load.py --checkpoint $(DEMO_DIR) --bundle "$$bundle"; \
	$(BIN)/python bench/memory.py --checkpoint $(DEMO_DIR) --bundle "$$bundle" --out $(OUT)/bench/memory_demo.json; \
	$(BIN)/python bench/embed_quality.py --checkpoint $(DEMO_DIR) --out $(OUT)/bench/embed_quality.json; \
	$(BIN)/python bench/forward.py --quick --repeats 3 --dtypes fp32

bench-full: full-checkpoint
	@set -euo pipefail; \
	$(BIN)/python bench/build.py --checkpoint $(FULL_DIR) --configs full_w4a8,llm_w4a8 --bundles $(OUT) --out $(OUT)/bench/build_full.json; \
	bundle=$$($(BIN)/duquant-packs build --config full_w4a8 --checkpoint $(FULL_DIR) --out $(OUT) -q | tail -n 1); \
	$(BIN)/python bench/load.py --checkpoint $(FULL_DIR) --bundle "$$bundle" --repeats 1 --out $(OUT)/bench/load_full.json; \
	$(BIN)/python bench/memory.py --checkpoint $(FULL_DIR) --bundle "$$bundle" --out $(OUT)/bench/memory_full.json; \
	int4=$$($(BIN)/duquant-packs build --config bench/configs/full_w4a8_int4embed.toml --checkpoint $(FULL_DIR) --out $(OUT) -q | tail -n 1); \
	$(BIN)/python bench/memory.py --checkpoint $(FULL_DIR) --bundle "$$int4" --out $(OUT)/bench/memory_full_int4embed.json; \
	$(BIN)/python bench/embed_speed.py; \
	$(BIN)/python bench/forward.py --repeats 3 --out $(OUT)/bench/forward_full.json; \
	$(BIN)/python bench/quality.py --seeds 2 --rows 128 --out $(OUT)/bench/quality_seeds2.json

# 1000 damaged copies of the demo's llm_w4a8 bundle, each read in a child with a 20 s deadline.
fuzz: $(STAMP)
	@set -euo pipefail; \
	ckpt=$$($(BIN)/duquant-packs demo-checkpoint --out $(DEMO_DIR)); \
	bundle=$$($(BIN)/duquant-packs build --config llm_w4a8 --checkpoint "$$ckpt" --out $(OUT) -q | tail -n 1); \
	$(BIN)/python bench/fuzz.py --bundle "$$bundle" --checkpoint $(DEMO_DIR) --cases 1000 --out $(OUT)/bench/fuzz.json

# Mutation testing of the modules that guard users (tools/mutants.py, docs/mutation.md); not in CI.
mutants: $(STAMP)
	$(BIN)/python -m pip install -q mutmut==3.8.1
	$(BIN)/python tools/mutants.py

# Move the pins on purpose: a fresh resolve of torch==$(DEV_TORCH) + '.[dev]' in a scratch venv.
constraints:
	@set -euo pipefail; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	$(PYTHON) -m venv "$$scratch"; \
	"$$scratch/bin/python" -m pip install -q --upgrade pip; \
	"$$scratch/bin/python" -m pip install -q torch==$(DEV_TORCH) -e '.[dev]'; \
	"$$scratch/bin/python" tools/pins.py freeze > constraints.txt.new; \
	mv constraints.txt.new constraints.txt; \
	git diff --stat -- constraints.txt

# The runtime's tests on the torch and transformers users pin, one venv each under .venv-compat/
# (tools/compat.py; not in CI): make test-compat [TARGETS="openpi lerobot dev"].
test-compat:
	$(PYTHON) tools/compat.py $(TARGETS)

# Everything that needs a GPU, in one script (bench/gpu_check.py): without CUDA one line, exit 0.
gpu-check: $(if $(GPU_PYTHON),,$(STAMP))
	@set -e; $(if $(GPU_PYTHON),$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .;) \
	$(or $(GPU_PYTHON),$(BIN)/python) bench/gpu_check.py --out $(OUT)/bench/gpu_check.json

full-checkpoint: $(STAMP)
	$(BIN)/duquant-packs demo-checkpoint --full-size --out $(FULL_DIR)

clean:
	rm -rf $(OUT)/*/ .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

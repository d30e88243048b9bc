# crf-rnn-3d: every target sets itself up (virtual environment, pinned packages, the package
# installed in editable mode with its compiled ops). `make help` lists the targets from the
# `## ` comments below.
SHELL := /bin/bash
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

# Framework-free C++ (no TensorFlow include): the lattice core and the CRF's mean-field kernel.
CSRC       := src/lattice_op/csrc
CRF_CSRC   := src/crf/csrc
BUILD      := build
EXT_SUFFIX := $(shell $(PYTHON_SYS) -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
# The op libraries, built by setup.py (pip's editable install) into the package folders.
LIB        := src/lattice_op/_lattice_ops$(EXT_SUFFIX) src/crf/_crf_ops$(EXT_SUFFIX)
LATTICE_SRC := $(CSRC)/permutohedral.cc $(CSRC)/gaussian.cc
CORE_SRC   := $(LATTICE_SRC) $(CRF_CSRC)/mean_field.cc
CORE_HDR   := $(wildcard $(CSRC)/*.h $(CRF_CSRC)/*.h)
CORE_INC   := -I$(CSRC) -I$(CRF_CSRC)
# The TensorFlow adapters: op registrations and kernels.
TF_SRC     := $(wildcard src/lattice_op/tf_op/*.cc src/lattice_op/tf_op/*.h src/crf/tf_op/*.cc)
CORE_OBJ   := $(patsubst $(CSRC)/%.cc,$(BUILD)/%.o,$(LATTICE_SRC))
CXX        ?= g++
OPT        ?= -O3
# The framework-free core is held to -Wall -Wextra -Werror; TensorFlow's headers warn, so the
# adapter only shows warnings.
CORE_FLAGS := -std=c++17 $(OPT) -fPIC -Wall -Wextra -Werror -pthread

PYTEST_ARGS ?=

.PHONY: setup build lint test test-core test-all bench-lattice bench-core bench-scaling study-feature-grad demo demo-brats demo-lattice clean help
.PHONY: reproduce-promise reproduce-brats smoke wheel-check check-gpu-ops gpu-check bench-tf-path
.PHONY: data-promise data-brats data-synthetic
.PHONY: bench bench-crf bench-crf-train bench-accuracy sanity-2d sanity-3d sanity-theta

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "make %-18s %s\n", $$1, $$2}'

setup: $(LIB) ## the virtual environment, pinned packages, the package (editable) and its ops

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@touch $@

build: $(LIB) ## compile the ops into the package (an editable install of crf-rnn-3d)

# The editable install compiles the ops in place (setup.py) with the installed TensorFlow; one
# install builds both libraries (a grouped target).
$(LIB) &: $(CORE_SRC) $(CORE_HDR) $(TF_SRC) setup.py pyproject.toml $(STAMP)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	@touch $(LIB)

$(BUILD)/%.o: $(CSRC)/%.cc $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CXX) $(CORE_FLAGS) -c $< -o $@

lint: $(STAMP) ## ruff (lint and format) and the C++ core with warnings as errors
	$(PY) -m ruff check src scripts tests setup.py
	$(PY) -m ruff format --check src scripts tests setup.py
	$(CXX) $(CORE_FLAGS) $(CORE_INC) -fsyntax-only $(CORE_SRC) tests/cpp/test_core.cc

# The framework-free core against references computed in the test itself, without TensorFlow.
test-core: $(BUILD)/test_core ## the C++ core's own test (no TensorFlow)
	$(BUILD)/test_core

$(BUILD)/test_core: tests/cpp/test_core.cc $(CORE_SRC) $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CXX) $(CORE_FLAGS) $(CORE_INC) tests/cpp/test_core.cc $(CORE_SRC) -o $@

test: $(LIB) lint test-core ## set up, build the ops, lint, run the C++ core test and the fast tests
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(LIB) lint test-core ## the same, slow tests included
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

# A wheel, installed into a fresh virtual environment outside the repository, runs CrfRnn,
# dense_crf and a filter call there.
wheel-check: $(STAMP) ## build the wheel, install it into a fresh venv in /tmp, run it there
	$(PY) scripts/check_wheel.py --full

# ---- the GPU path (docs/benchmarks.md, "The TF-op path and the GPU"). The GPU build of
# TensorFlow goes into a separate environment, .venv-gpu, of the same version as requirements.txt.
GPU_VENV   := .venv-gpu
TF_VERSION := $(shell sed -n 's/^tensorflow-cpu==//p' requirements.txt)

# The GPU build alone, for its kernel registry: it installs and imports on a CPU-only machine.
$(GPU_VENV)/.registry:
	@test -x $(GPU_VENV)/bin/python || $(PYTHON_SYS) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GPU_VENV)/bin/python -m pip install --quiet tensorflow==$(TF_VERSION)
	@touch $@

# The ops of a traced CrfRnn training step and dense_crf call on the TF path, each looked up in
# the GPU build's kernel registry (no GPU needed; the first run downloads the GPU build).
check-gpu-ops: $(LIB) $(GPU_VENV)/.registry ## prove from TF's kernel registry that the TF path runs on a GPU
	@mkdir -p $(BUILD)
	$(PY) scripts/check_gpu_ops.py trace --out $(BUILD)/gpu_ops.json
	$(GPU_VENV)/bin/python scripts/check_gpu_ops.py registry $(BUILD)/gpu_ops.json --markdown $(BUILD)/gpu_ops.md

# The GPU build with CUDA's libraries, the pinned packages and the package itself (its ops
# compiled against that build, same version).
$(GPU_VENV)/.full: requirements.txt $(GPU_VENV)/.registry
	@mkdir -p $(BUILD)
	grep -v '^tensorflow-cpu' requirements.txt > $(BUILD)/requirements-gpu.txt
	$(GPU_VENV)/bin/python -m pip install --quiet "tensorflow[and-cuda]==$(TF_VERSION)" -r $(BUILD)/requirements-gpu.txt
	$(GPU_VENV)/bin/python -m pip install --quiet --no-build-isolation --no-deps -e .
	@touch $@

gpu-check: $(GPU_VENV)/.full ## on an NVIDIA machine: the TF path on the GPU against the compiled kernels (table)
	$(GPU_VENV)/bin/python scripts/gpu_check.py $(ARGS)

# The same script without a GPU: the TF path on the CPU against the compiled kernels.
bench-tf-path: $(LIB) ## the TF-op path against the compiled kernels on the CPU (docs/benchmarks.md)
	$(PY) scripts/gpu_check.py $(ARGS)

demo-lattice: $(LIB) ## filter a synthetic 3D volume with the lattice op and check it
	$(PY) scripts/demo_lattice.py

# The main job (docs/experiments.md): phantoms -> 5-fold CV with and without the CRF -> report.
demo: $(LIB) ## 5-fold CV, V-Net and three CRF variants, PROMISE12-like phantoms -> results/reports/demo
	$(PY) -m crf_rnn_3d.experiments.cross_validate experiment=demo $(ARGS)

# The BraTS protocol on phantoms (docs/experiments.md): 40 BraTS-like cases at 4 mm, 85/15
# holdout, the preset's variants, regions whole/core/enhancing -> report in the paper's Table 2 layout.
demo-brats: $(LIB) ## 85/15 holdout, V-Net and three CRF variants, BraTS-like phantoms -> results/reports/demo_brats
	$(PY) -m crf_rnn_3d.experiments.cross_validate experiment=demo_brats $(ARGS)

# The paper's protocols at full size on the real data (stops at once if it is missing).
reproduce-promise: $(LIB) ## the paper's PROMISE12 protocol (data/raw/promise12; ARGS: overrides)
	$(PY) -m crf_rnn_3d.experiments.cross_validate experiment=promise_cv $(ARGS)

reproduce-brats: $(LIB) ## the paper's BraTS 2015 protocol (BRATS_DATA=brats_nifti for NIfTI)
	$(PY) -m crf_rnn_3d.experiments.cross_validate experiment=brats_holdout data=$(BRATS_DATA) $(ARGS)

# Everything it writes (phantoms, cache, runs, report) goes under output_root (results/).
smoke: $(LIB) ## the CI smoke chain: 4 tiny phantoms, 2 folds, 4 steps, report (results/)
	$(PY) -m crf_rnn_3d.experiments.cross_validate experiment=smoke $(ARGS)

# Data sets: raw files under data/raw/, preprocessed cache under data/processed/ (data/README.md).
BRATS_DATA ?= brats2015

data-promise: $(LIB) ## preprocess PROMISE12 from data/raw/promise12 (ARGS: Hydra overrides)
	$(PY) -m crf_rnn_3d.experiments.prepare data=promise12 $(ARGS)

data-brats: $(LIB) ## preprocess BraTS 2015 HGG (BRATS_DATA=brats_nifti for 2018+ NIfTI)
	$(PY) -m crf_rnn_3d.experiments.prepare data=$(BRATS_DATA) $(ARGS)

data-synthetic: $(LIB) ## write and preprocess the PROMISE12-like and BraTS-like phantoms
	$(PY) -m crf_rnn_3d.experiments.prepare data=synthetic_promise $(ARGS)
	$(PY) -m crf_rnn_3d.experiments.prepare data=synthetic_brats $(ARGS)

# Every figure the README quotes, each against its peer in the same run: one JSON, one table.
bench: $(BENCH_STAMP) $(LIB) ## every comparison (dense_crf, lattice op, accuracy, CRF training) -> results/bench/<time>/summary.md
	$(PY) scripts/bench_all.py $(ARGS)

bench-lattice: $(BENCH_STAMP) $(LIB) ## lattice op benchmark against pydensecrf2 (docs/benchmarks.md)
	$(PY) scripts/bench_lattice.py $(ARGS)

# The lattice's accuracy settings against the exact filter and pydensecrf2 (docs/benchmarks.md).
bench-accuracy: $(BENCH_STAMP) $(LIB) ## lattice error vs exact filter and cost per accuracy setting, beside pydensecrf2
	$(PY) scripts/bench_accuracy.py $(ARGS)

# Route 1 vs route 2 of the features' gradient against the exact one (docs/lattice_op.md).
study-feature-grad: $(LIB) ## the features' gradient routes against the exact one
	$(PY) scripts/study_feature_grad.py

# Stage timings of the C++ core without TensorFlow (docs/lattice_op.md), 1 and 2 threads.
bench-core: $(LIB) $(CORE_OBJ) scripts/bench_core.cc ## stage timings of the C++ lattice core alone
	$(CXX) $(CORE_FLAGS) $(CORE_INC) scripts/bench_core.cc $(CORE_OBJ) -o $(BUILD)/bench_core
	$(PY) scripts/bench_lattice.py --dump $(BUILD)/bench_data $(ARGS)
	@for ref in $(BUILD)/bench_data/*/; do for t in 1 2; do $(BUILD)/bench_core $$ref $$t 3; done; done

# Build and filter over four crops of the BraTS reference, 1 and 2 threads, fitted exponent of N.
bench-scaling: $(LIB) $(CORE_OBJ) scripts/bench_core.cc ## the C++ core's scaling in voxels and threads
	$(CXX) $(CORE_FLAGS) $(CORE_INC) scripts/bench_core.cc $(CORE_OBJ) -o $(BUILD)/bench_core
	$(PY) scripts/bench_scaling.py $(ARGS)

# CRF (docs/crf.md): benchmark against pydensecrf2, and the paper's sanity experiment (Fig. 3).
bench-crf: $(BENCH_STAMP) $(LIB) ## dense_crf against pydensecrf2 on phantoms (docs/crf.md)
	$(PY) scripts/bench_crf.py pydensecrf $(ARGS)

# The CRF head's training step at the paper's sizes: time, peak memory, with and without
# recompute, both backends (docs/benchmarks.md, "The CRF head in training").
bench-crf-train: $(LIB) ## CrfRnn forward + backward: time and peak memory, recompute on / off
	$(PY) scripts/bench_crf_train.py --held --vnet $(ARGS)

sanity-2d: $(LIB) ## train only the CRF to undo a distorted segmentation of a photo
	$(PY) scripts/sanity_2d.py $(ARGS)

sanity-3d: $(LIB) ## the same on a 3D phantom with soft borders (results/sanity_3d)
	$(PY) scripts/sanity_3d.py $(ARGS)

# Learning theta from widths 4x too wide, against grid searches (docs/crf.md); ARGS="--dim 2"
sanity-theta: $(LIB) ## learn the kernel widths from 4x too wide, against grid searches
	$(PY) scripts/sanity_theta.py $(if $(ARGS),$(ARGS),--dim 3)

clean: ## remove the build folder and the compiled ops
	rm -rf $(BUILD) src/lattice_op/_lattice_ops*.so src/crf/_crf_ops*.so

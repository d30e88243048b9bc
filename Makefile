# crf-rnn-3d: every target sets itself up (virtual environment, pinned packages, compiled op).
SHELL := /bin/bash
PYTHON_SYS ?= $(shell command -v python3.11 || command -v python3)
VENV       := .venv
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

CSRC       := src/lattice_op/csrc
BUILD      := build
LIB        := $(BUILD)/libcrf3d_lattice.so
CORE_SRC   := $(CSRC)/permutohedral.cc $(CSRC)/gaussian.cc $(CSRC)/mean_field.cc
CORE_HDR   := $(CSRC)/permutohedral.h $(CSRC)/parallel.h $(CSRC)/gaussian.h $(CSRC)/mean_field.h
TF_SRC     := $(CSRC)/tf_ops.cc $(CSRC)/tf_kernels.cc
CORE_OBJ   := $(patsubst $(CSRC)/%.cc,$(BUILD)/%.o,$(CORE_SRC))
CXX        ?= g++
OPT        ?= -O3
# The framework-free core is held to -Wall -Wextra -Werror; TensorFlow's headers warn, so the
# adapter only shows warnings.
CORE_FLAGS := -std=c++17 $(OPT) -fPIC -Wall -Wextra -Werror -pthread

PYTEST_ARGS ?=

.PHONY: setup build lint test test-all bench-lattice bench-core study-feature-grad demo demo-lattice clean help
.PHONY: reproduce-promise reproduce-brats smoke
.PHONY: data-promise data-brats data-synthetic
.PHONY: bench-crf sanity-2d sanity-3d sanity-theta

help:
	@echo "make test           set up, build the op, lint, run the fast tests"
	@echo "make test-all       the same, slow tests included"
	@echo "make demo           5-fold CV of V-Net with/without the CRF on phantoms -> report (results/demo)"
	@echo "make demo-lattice   filter a synthetic 3D volume with the lattice op and check it"
	@echo "make reproduce-promise  the paper's PROMISE12 protocol (data/raw/promise12; ARGS: overrides)"
	@echo "make reproduce-brats    the paper's BraTS 2015 protocol (BRATS_DATA=brats_nifti for NIfTI)"
	@echo "make smoke          the CI smoke chain: 4 tiny phantoms, 2 folds, 4 steps, report"
	@echo "make bench-lattice  lattice op benchmark against pydensecrf2 (docs/benchmarks.md)"
	@echo "make bench-core     stage timings of the C++ lattice core alone (docs/lattice_op.md)"
	@echo "make build          compile the TensorFlow op into $(LIB)"
	@echo "make data-promise   preprocess PROMISE12 from data/raw/promise12 (ARGS: Hydra overrides)"
	@echo "make data-brats     preprocess BraTS 2015 HGG (BRATS_DATA=brats_nifti for 2018+ NIfTI)"
	@echo "make data-synthetic write and preprocess the PROMISE12-like and BraTS-like phantoms"
	@echo "make bench-crf      dense_crf against pydensecrf2 on phantoms (docs/crf.md)"
	@echo "make sanity-2d      train only the CRF to undo a distorted segmentation of a photo"
	@echo "make sanity-3d      the same on a 3D phantom with soft borders (results/sanity_3d)"
	@echo "make sanity-theta   learn the kernel widths from 4x too wide, against grid searches"

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

$(BENCH_STAMP): requirements-bench.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-bench.txt
	@touch $@

build: $(LIB)

$(BUILD)/%.o: $(CSRC)/%.cc $(CORE_HDR)
	@mkdir -p $(BUILD)
	$(CXX) $(CORE_FLAGS) -c $< -o $@

$(LIB): $(CORE_OBJ) $(TF_SRC) $(CORE_HDR) $(STAMP)
	@mkdir -p $(BUILD)
	$(CXX) -std=c++17 $(OPT) -fPIC -shared -pthread -Wall -Wno-deprecated-declarations \
	  $$($(PY) -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_compile_flags()))' 2>/dev/null) \
	  $(TF_SRC) $(CORE_OBJ) -o $@.tmp \
	  $$($(PY) -c 'import tensorflow as tf; print(" ".join(tf.sysconfig.get_link_flags()))' 2>/dev/null)
	@mv $@.tmp $@

lint: $(STAMP)
	$(PY) -m ruff check src scripts tests
	$(PY) -m ruff format --check src scripts tests
	$(CXX) $(CORE_FLAGS) -fsyntax-only $(CORE_SRC)

test: $(STAMP) $(LIB) lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP) $(LIB) lint
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

demo-lattice: $(STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/demo_lattice.py

# The main job (docs/experiments.md): phantoms -> 5-fold CV with and without the CRF -> report.
demo: $(STAMP) $(LIB)
	$(PY) -m src.experiments.cross_validate experiment=demo $(ARGS)

# The paper's protocols at full size on the real data (stops at once if it is missing).
reproduce-promise: $(STAMP) $(LIB)
	$(PY) -m src.experiments.cross_validate experiment=promise_cv $(ARGS)

reproduce-brats: $(STAMP) $(LIB)
	$(PY) -m src.experiments.cross_validate experiment=brats_holdout data=$(BRATS_DATA) $(ARGS)

smoke: $(STAMP) $(LIB)
	$(PY) -m src.experiments.cross_validate experiment=smoke data.root=runs/smoke_data/raw \
	  data.processed=runs/smoke_data/processed $(ARGS)

# Data sets: raw files under data/raw/, preprocessed cache under data/processed/ (data/README.md).
BRATS_DATA ?= brats2015

data-promise: $(STAMP)
	$(PY) -m src.experiments.prepare data=promise12 $(ARGS)

data-brats: $(STAMP)
	$(PY) -m src.experiments.prepare data=$(BRATS_DATA) $(ARGS)

data-synthetic: $(STAMP)
	$(PY) -m src.experiments.prepare data=synthetic_promise $(ARGS)
	$(PY) -m src.experiments.prepare data=synthetic_brats $(ARGS)

bench-lattice: $(BENCH_STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/bench_lattice.py $(ARGS)

# Route 1 vs route 2 of the features' gradient against the exact one (docs/lattice_op.md).
study-feature-grad: $(STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/study_feature_grad.py

# Stage timings of the C++ core without TensorFlow (docs/lattice_op.md), 1 and 2 threads.
bench-core: $(STAMP) $(CORE_OBJ) scripts/bench_core.cc
	$(CXX) $(CORE_FLAGS) -I$(CSRC) scripts/bench_core.cc $(CORE_OBJ) -o $(BUILD)/bench_core
	PYTHONPATH=. $(PY) scripts/bench_lattice.py --dump $(BUILD)/bench_data $(ARGS)
	@for ref in $(BUILD)/bench_data/*/; do for t in 1 2; do $(BUILD)/bench_core $$ref $$t 3; done; done

# CRF (docs/crf.md): benchmark against pydensecrf2, and the paper's sanity experiment (Fig. 3).
bench-crf: $(BENCH_STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/bench_crf.py pydensecrf $(ARGS)

sanity-2d: $(STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/sanity_2d.py $(ARGS)

sanity-3d: $(STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/sanity_3d.py $(ARGS)

# Learning theta from widths 4x too wide, against grid searches (docs/crf.md); ARGS="--dim 2"
sanity-theta: $(STAMP) $(LIB)
	PYTHONPATH=. $(PY) scripts/sanity_theta.py $(if $(ARGS),$(ARGS),--dim 3)

clean:
	rm -rf $(BUILD)

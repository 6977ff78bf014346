# `make test` and `make train` work on a fresh machine: both install first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS := tensorflow jax torch
PYTEST_ARGS ?=

.PHONY: install test $(addprefix test-,$(BACKENDS)) train bench lint clean

install: $(VENV)/.installed

# torch==2.13.0 first, exactly: it is the CPU build found locally, and any
# looser spec makes pip fetch a multi-GB CUDA build. The extras' `torch>=2.1`
# is then already satisfied.
# timm and torchvision are the tests' independent references (RandAugment, erasing, models).
# The registry's torchvision wheel is a CUDA build whose dependency pins would pull another
# torch: installed without dependencies, its Python code runs on the CPU torch (the tests
# declare the two compiled ops its import registers; see tests/vision_reference.py).
$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,jax,torch,onnx]"
	$(PY) -m pip install --no-deps timm==1.0.31 torchvision==0.28.0
	touch $@

# One pytest process per backend: Keras picks its backend once per process. The three run side by side
# (-j): much of a test's time is single-threaded tracing, compiling and waiting on subprocesses, so a
# 2-core machine finishes them sooner together than one after another. -O prints each backend's output
# whole when it ends. TEST_JOBS=1 runs them one at a time. Each prints its 15 slowest tests: where CI time goes.
# Files marked backend_free (tests/conftest.py) run in the torch process only: their results are the same on
# every backend.
TEST_JOBS ?= 3
# The JAX suite holds the most work: split over two pytest-xdist workers (each test file stays on one worker,
# so its module fixtures are built once), it keeps both cores busy after the other two backends finish.
# JAX_WORKERS= runs it in one process.
JAX_WORKERS ?= -n 2 --dist loadfile
test: install
	@$(MAKE) --no-print-directory -j$(TEST_JOBS) -O $(addprefix test-,$(BACKENDS))

$(addprefix test-,$(BACKENDS)): test-%: install
	@echo "=== KERAS_BACKEND=$* ==="
	KERAS_BACKEND=$* $(PY) -m pytest --durations=15 $(if $(filter torch,$*),,-m "not backend_free") \
		$(if $(filter jax,$*),$(JAX_WORKERS)) $(PYTEST_ARGS)

# The demo recipe on the embedded digits data: offline, about a minute on a 2-core CPU.
# It prints the run directory. Extra flags: make train TRAIN_ARGS="--epochs 3".
TRAIN_ARGS ?=
train: install
	$(PY) scripts/train.py --recipe demo $(TRAIN_ARGS)

# Depthwise-conv and model throughput, every implementation beside PyTorch (see README, Speed).
BENCH_ARGS ?=
bench: install
	KERAS_BACKEND=jax $(PY) scripts/benchmark.py $(BENCH_ARGS)

# Lint and formatting, checked only: `ruff format` (without --check) rewrites the files.
LINT_PATHS := keras_convmixer scripts tests benchmarks
lint: install
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

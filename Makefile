# Two commands for a fresh machine (see README):  make demo   |   make test
# Everything installs into .venv from this repository's own files.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test repro clean-demo chromium

setup: $(VENV)/.installed data/raw

# torch and torchvision come from PyPI first (--isolated skips this machine's local find-links, whose
# CPU-only torch wheel has no matching torchvision; PyPI's CUDA build runs on CPUs). pip then sees
# torch satisfied and installs the rest from pyproject.toml. The demo needs only the runtime; the test
# extras come with `make test` (llama-cpp-python compiles llama.cpp: ~15 min on a fresh 2-core machine
# with no pip cache, more than the whole demo).
# EDITABLE_QUIET: setuptools prints an "Editable installation ... be careful with folders in your working
# directory with the same name as your package" notice for every editable install that needs its import
# finder, which ours does (kernels/, tasks/, flows/ map into visiontune). It is information, not a fault:
# the one package is visiontune and the repo root holds no top-level kernels/tasks/flows package. Filtered by
# its message only, for these pip calls only.
EDITABLE_QUIET := PYTHONWARNINGS="ignore:Editable installation"
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --isolated torch==2.13.0 torchvision==0.28.0
	$(EDITABLE_QUIET) $(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(EDITABLE_QUIET) $(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

# DVC tracks data/raw (data.dvc), git does not, and a fresh clone has no DVC cache to check it out from. The demo
# generator is deterministic and its pages hash exactly to data.dvc's md5, so setting up generates them (3,000
# pages, about a minute) and a plain `dvc repro` then works on a fresh clone (tests/test_fresh_clone.py).
# Existing data/raw is never touched.
data/raw: | $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/visiontune demo-data

# The main job: the whole pipeline (validate -> normalize -> convert -> train -> evaluate -> register) on
# the bundled handwriting demo, offline, as a Prefect flow tracked in MLflow under mlflow/.
demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/visiontune run

# `pytest` (not `python -m pytest`): the latter puts the repo root on sys.path, where the top-level
# kernels/ folder would shadow Hugging Face's `kernels` package.
test: setup $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

# Debian's headless Chromium and its chromedriver, for the run report's browser test (needs root; .ci/run
# calls it). Selenium drives them as they are: no browser is downloaded.
chromium:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

# The same pipeline through DVC. dvc runs each stage's `cmd` (`visiontune ...`) through the shell, so
# the venv's bin/ must be on PATH. After a `make demo` the first repro re-runs the stages once (the flow
# does not fill DVC's cache); later ones skip what did not change. `make repro STAGES=validate` stops
# after a stage.
STAGES ?=
repro: setup
	PATH="$(abspath $(BIN)):$$PATH" HF_HUB_OFFLINE=1 $(BIN)/dvc repro $(STAGES)

# Not models/visiontune-read-base: the pretrained demo base is committed (the pretrain stage rebuilds it).
clean-demo:
	rm -rf data/validated data/normalized data/dataset outputs models/tiny-* mlflow/mlflow.db mlflow/artifacts

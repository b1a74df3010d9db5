# `make run` and `make test` each set themselves up on a fresh machine (Python 3.11).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg
# SmolLM2 converted once from its GGUF file (ecoflap_utils/zoo/smollm.py): kept in the checkout, so that a fresh
# clone starts from nothing and `make clean` empties it
export ECOFLAP_CACHE ?= $(CURDIR)/.cache

.PHONY: setup run test bench clean

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m ecoflap_utils runs grids/default.yaml --out runs --jobs $(JOBS)

# Two pytest workers with one intra-op thread each (tests/conftest.py starts the two whole-grid notebook runs
# first, one on each worker). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1} $(PY) -m pytest tests -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) bench/scores.py

clean:
	rm -rf $(VENV) runs .pytest_cache .cache

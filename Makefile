# `make train` and `make test` each create .venv and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# What this machine needs (CUDA build of torch that loads torchvision's ops); override elsewhere,
# e.g. `make test TORCH="torch torchvision"`.
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: install train test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,test,export]"
	touch $(STAMP)

install: $(STAMP)

# The main job: the toy comparison of the variants (see README), plots and table under runs/.
# ARGS go to `detr-lineage ablate`, e.g. make train ARGS="--seeds 0 1 2 --jobs 2".
ARGS ?=
train: install
	$(PY) -m detr_lineage ablate experiments/ablations/toy_main.yaml $(ARGS)

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -n 2 -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: install
	for f in benchmarks/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

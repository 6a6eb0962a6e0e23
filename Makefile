# Newcomer commands: `make serve` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
EPOCHS ?= 20
RUN_DIR ?= runs/cifar10
BUNDLE ?= models/cifar10-resnet

.PHONY: install test serve train export lint format bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

serve: $(STAMP)
	CAMSERVE_HOST=$${CAMSERVE_HOST:-127.0.0.1} CAMSERVE_PORT=$${CAMSERVE_PORT:-8000} $(PY) -m service

train: $(STAMP)
	$(PY) -m training fit --data-dir $(DATA) --epochs $(EPOCHS) --run-dir $(RUN_DIR)

export: $(STAMP)
	$(PY) -m training export $(RUN_DIR)/checkpoints/last.ckpt --data-dir $(DATA) --out $(BUNDLE)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/hadolint Dockerfile
	$(PY) docker/check_manifests.py  # k8s.yaml and kserve.yaml, offline

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

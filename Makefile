# Newcomer commands: `make serve` and `make test`. Both set up .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
EPOCHS ?= 20
RUN_DIR ?= runs/cifar10
BUNDLE ?= models/cifar10-resnet

.PHONY: install test serve train export lint format bench clean proto

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

# The gRPC protocol's Python module, committed (serving needs no protoc): protoc from grpcio-tools (pinned in
# the dev extra), then its descriptors moved into a pool of their own, so that tritonclient's or KServe's
# module of the same package "inference" can be imported in the same process (the default pool refuses
# a second definition of a symbol). tests/test_grpc.py checks the committed module is what this makes.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. service/grpc/inference.proto
	sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' service/grpc/inference_pb2.py

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Newcomer commands: `make serve` and `make test`. Both set up .venv on first use, from the lock
# (requirements/dev.lock: every package pinned and hashed; `make lock` refreshes it from pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The fast tier: in process only (tests/conftest.py fails a test there that starts a process), 60 s a test at most.
FAST := -m "not server and not browser and not slow" --timeout=60
# Locks are resolved for the images' platform: CPython 3.11 on x86-64 Linux (glibc 2.28 or newer).
LOCK := $(VENV)/bin/uv pip compile pyproject.toml --quiet --generate-hashes --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock"
DATA ?= ../shared/data/cifar10-jpeg.tar.gz
EPOCHS ?= 20
RUN_DIR ?= runs/cifar10
BUNDLE ?= models/cifar10-resnet

.PHONY: install test test-fast serve train export lint format lock bench clean proto

$(STAMP): pyproject.toml requirements/dev.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install --require-hashes -r requirements/dev.lock
	$(PY) -m pip install --no-deps -e .
	touch $@

install: $(STAMP)

# Everything, as CI runs it: the in-process tests, the real servers on loopback, the browser.
test: $(STAMP)
	$(PY) -m pytest

# The in-process tier: no server, no subprocess, no browser; a minute or two.
test-fast: $(STAMP)
	$(PY) -m pytest $(FAST)

# Pin and hash what pyproject.toml asks for: the CUDA image (serve.lock, torch from PyPI), the CPU image
# (serve-cpu.lock: the same less torch and its CUDA libraries, which come from PyTorch's CPU index) and
# the dev/CI venv (dev.lock). Versions already locked are kept; `make lock UPGRADE=--upgrade` moves them.
lock: $(STAMP)
	$(LOCK) $(UPGRADE) -o requirements/serve.lock
	$(LOCK) $(UPGRADE) --extra openvino --no-emit-package torch \
		$$(grep -oE '^(nvidia-|cuda-|triton)[a-z0-9.-]*' requirements/serve.lock | sed 's/^/--no-emit-package /') \
		-o requirements/serve-cpu.lock
	$(LOCK) $(UPGRADE) --extra dev -o requirements/dev.lock

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

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# tests/ for helpers; bench/ for the server harness and fixtures the benchmarks share (bench never imports tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "bench"))

from helpers import make_bundle, make_image_folder

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = REPO / "models" / "cifar10-resnet"

# Tests share 2 cores with whatever else runs; keep torch from oversubscribing them.
torch.set_num_threads(min(2, os.cpu_count() or 1))
# The tests written for the torch engine keep it (and their speed: converting a network to OpenVINO takes
# seconds). tests/test_openvino.py asks for the openvino runtime by name; CAMSERVE_RUNTIME=auto runs the rest on it.
os.environ.setdefault("CAMSERVE_RUNTIME", "torch")


def shared_cifar_archive() -> Path | None:
    """The real CIFAR-10 JPEG archive, where this machine has it (never committed)."""
    candidates = [
        os.environ.get("CAMSERVE_CIFAR_ARCHIVE", ""),
        REPO.parent / "shared/data/cifar10-jpeg.tar.gz",
        Path("/work/shared/data/cifar10-jpeg.tar.gz"),
    ]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("tiny-cifar"))


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "test-bundle")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")

from __future__ import annotations

import os
import platform
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# tests/ for helpers; bench/ for the kit (harness.py) and fixtures the benchmarks share (bench never imports tests)
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "bench"))

from helpers import make_bundle, make_image_folder

REPO = Path(__file__).resolve().parent.parent
SHIPPED_BUNDLE = REPO / "models" / "cifar10-resnet"

# The apps tests build serve gRPC only where a test asks for it on a port of its own (tests/test_grpc.py):
# never on the default 8001, which every app and server on this machine would share (SO_REUSEPORT).
os.environ.setdefault("CAMSERVE_GRPC_PORT", "0")

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


# A run stopped with SIGTERM (a CI timeout, `timeout 300 make test`) unwinds like Ctrl-C: every fixture's
# and the kit's `finally` stops its servers, which run in sessions of their own and would outlive it.
def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


signal.signal(signal.SIGTERM, _interrupt)


# -- the tiers: a test that starts a process says so ------------------------------------------------
# Every way Python starts a process raises one of these audit events (multiprocessing's fork and
# forkserver included; its spawn goes through _posixsubprocess, wrapped below).
SPAWN_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system"})
_spawn_allowed = True  # outside a test's setup, call and teardown (collection, session start)
_current_test = ""


def _refuse_unmarked_spawns(event: str, args: tuple) -> None:
    if event in SPAWN_EVENTS and not _spawn_allowed:
        command = args[1] if event == "subprocess.Popen" else args[:1]  # never the environment
        raise RuntimeError(
            f"{_current_test} starts a process ({event}: {str(command)[:200]}) but is not marked "
            "@pytest.mark.server: the fast tier (make test-fast) must start none"
        )


sys.addaudithook(_refuse_unmarked_spawns)
# platform.processor() runs `uname -p` once per process and keeps the answer (Lightning asks for it):
# asked here, before any test, no in-process test is taken for one that starts a process.
platform.processor()


def _guard_multiprocessing_spawn() -> None:
    """multiprocessing's spawn start method reaches _posixsubprocess without an audit event."""
    import multiprocessing.util as mp_util

    spawnv_passfds = mp_util.spawnv_passfds

    def audited(path, args, passfds):
        sys.audit("os.posix_spawn", path, args, None)
        return spawnv_passfds(path, args, passfds)

    mp_util.spawnv_passfds = audited


_guard_multiprocessing_spawn()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """While a test runs (its setup, which starts module fixtures' servers, to its teardown), it may
    start processes only if it is marked ``server``."""
    global _spawn_allowed, _current_test
    _spawn_allowed, _current_test = item.get_closest_marker("server") is not None, item.nodeid
    try:
        return (yield)
    finally:
        _spawn_allowed, _current_test = True, ""

"""The locks (requirements/*.lock) agree with pyproject.toml: every package it asks for is pinned there,
at a version its range allows, with hashes; a change to pyproject.toml without `make lock` fails here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s\\]+)", re.M)


def pins(lock: str) -> dict[str, Version]:
    """name -> pinned version; every entry must carry its hashes."""
    found = {}
    for entry in re.split(r"\n(?=[A-Za-z0-9][A-Za-z0-9._-]*==)", (ROOT / "requirements" / lock).read_text()):
        if match := PIN.match(entry):
            assert "--hash=sha256:" in entry, f"{lock}: {match[1]} is pinned without a hash"
            found[canonicalize_name(match[1])] = Version(match[2])
    return found


def extra_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    """What pyproject's extras ask for, an extra that names camserve's own extras expanded."""
    found: list[Requirement] = []
    for extra in extras:
        for line in PROJECT["optional-dependencies"][extra]:
            requirement = Requirement(line)
            found += extra_requirements(tuple(requirement.extras)) if requirement.name == "camserve" else [requirement]
    return found


def wanted(extras: tuple[str, ...] = ()) -> list[Requirement]:
    return [Requirement(line) for line in PROJECT["dependencies"]] + extra_requirements(extras)


@pytest.mark.parametrize(
    ("lock", "extras", "left_out"),
    [("serve.lock", (), set()), ("serve-cpu.lock", (), {"torch"}), ("dev.lock", ("dev",), set())],
)
def test_every_requirement_is_pinned_within_its_range(lock: str, extras: tuple[str, ...], left_out: set[str]) -> None:
    locked = pins(lock)
    for requirement in wanted(extras):
        name = canonicalize_name(requirement.name)
        if name in left_out or (requirement.marker and not requirement.marker.evaluate()):
            continue
        assert name in locked, f"{lock} has no {name}: run `make lock`"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"{lock} pins {name}=={locked[name]}, outside pyproject's {requirement.specifier}: run `make lock`"
        )


def test_the_cpu_lock_holds_no_torch_and_no_cuda_library() -> None:
    cuda = [
        name for name in pins("serve-cpu.lock") if name == "torch" or name.startswith(("nvidia-", "cuda-", "triton"))
    ]
    assert not cuda, cuda

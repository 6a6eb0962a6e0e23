"""The house's floors, read from the source: who may import whom.

``camcore`` is the model core beneath both ``training`` and ``service``; the two stand on it side by
side and never import each other, and the service needs nothing that only training installs (the
serving image has no Lightning). Every import statement counts, in functions and ``TYPE_CHECKING``
blocks too: the modules are parsed (``ast``), not imported.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("camcore", "service", "training")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def imported_names(module: str) -> Iterator[str]:
    """Every dotted name the module's import statements load; relative imports made absolute."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            # `from pkg import submodule` imports the submodule, `from module import name` the module
            # (the longest prefix that is a module, below); a parent package's __init__ is not counted,
            # as import-linter does not count it either.
            yield from (f"{source}.{alias.name}" for alias in node.names)


def project_imports(module: str) -> set[str]:
    """The project's modules this one imports (the longest dotted prefix that is a module)."""
    found = set()
    for name in imported_names(module):
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            if ".".join(parts[:end]) in MODULES:
                found.add(".".join(parts[:end]))
                break
    found.discard(module)
    return found


def top_levels(package: str) -> dict[str, set[str]]:
    """Top-level names imported anywhere in ``package`` -> the modules that import them."""
    users: dict[str, set[str]] = {}
    for module in MODULES:
        if module.split(".")[0] == package:
            for name in imported_names(module):
                users.setdefault(name.split(".")[0], set()).add(module)
    return users


def _distribution(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()


def train_only_distributions() -> set[str]:
    """What pyproject installs only for training, development or benchmarks, not to serve."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {_distribution(r) for r in project["dependencies"]}
    # The openvino extra is a serving runtime (the CPU image has it), not training's.
    groups = {name: group for name, group in project["optional-dependencies"].items() if name != "openvino"}
    extras = {_distribution(r) for group in groups.values() for r in group}
    return extras - runtime - {"camserve"}


def distributions_of(top_level: str) -> set[str]:
    names = importlib.metadata.packages_distributions().get(top_level, [])
    return {re.sub(r"[-_.]+", "-", name).lower() for name in names}


def test_every_package_was_parsed():
    assert {module.split(".")[0] for module in MODULES} == set(PACKAGES)
    assert {"camcore.forward", "service.api.routes", "training.export"} <= set(MODULES)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("camcore", {"service", "training", "lightning", "pytorch_lightning", "fastapi", "starlette", "uvicorn"}),
        ("service", {"training", "lightning", "pytorch_lightning", "lightning_fabric"}),
        ("training", {"service"}),
    ],
)
def test_packages_import_only_what_lies_beneath_them(package, forbidden):
    users = top_levels(package)
    broken = {name: sorted(users[name]) for name in forbidden & set(users)}
    assert not broken, f"{package} imports what it must not: {broken}"


@pytest.mark.parametrize("package", ["camcore", "service"])
def test_serving_needs_nothing_that_only_training_installs(package):
    train_only = train_only_distributions()
    assert {"lightning", "torchvision"} <= train_only  # the check has teeth
    users = top_levels(package)
    broken = {
        name: sorted(modules)
        for name, modules in users.items()
        if name not in sys.stdlib_module_names and name not in PACKAGES and distributions_of(name) & train_only
    }
    assert not broken, f"{package} imports packages only the train/dev/bench extras install: {broken}"


def test_no_import_cycles_among_the_projects_modules():
    graph = {module: project_imports(module) for module in MODULES}
    assert graph["service.http.admission"] >= {"service.state", "service.fronts.gate"}  # the graph is really read
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        pytest.fail(f"import cycle: {' -> '.join(exc.args[1])}")


def test_benchmarks_never_import_the_tests():
    """The tests import ``bench/harness.py`` and ``bench/fixtures.py``; never the other way round."""
    test_modules = {path.stem for path in (ROOT / "tests").glob("*.py")}
    for path in sorted((ROOT / "bench").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {name.split(".")[0] for name in names} & (test_modules | {"tests"}), path.name
        assert '"tests"' not in path.read_text(), f"{path.name} reaches into tests/"


# service/'s rooms, lowest first: a module may import only from its own room or a lower floor, and the
# rooms on one floor never import each other.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("service.settings", "service.tracing"),
    ("service.inference", "service.decoding"),
    ("service.metrics",),
    ("service.state",),
    ("service.fronts",),
    ("service.http",),
    ("service.api", "service.oip", "service.grpc"),
    ("service.app",),
    ("service.runtime",),
    ("service.__main__",),
)
WEB_FRAMEWORKS = {"fastapi", "starlette", "uvicorn", "httptools", "multipart", "python_multipart", "h11"}
HTTP_ROOMS = ("service.http", "service.api", "service.oip", "service.grpc", "service.app", "service.runtime")


def room_of(module: str) -> tuple[int, str]:
    for floor, rooms in enumerate(FLOORS):
        for room in rooms:
            if module == room or module.startswith(room + "."):
                return floor, room
    raise AssertionError(f"{module} is in no room of FLOORS: give it one")


def test_every_service_module_has_a_room():
    for module in MODULES:
        if module.startswith("service.") and MODULES[module].name != "__init__.py":
            room_of(module)


def test_no_room_imports_a_higher_one_or_a_neighbour():
    graph = {module: project_imports(module) for module in MODULES if module.startswith("service.")}
    assert "service.inference.registry" in graph["service.state"]  # the graph is really read
    broken = []
    for module, imports in graph.items():
        if MODULES[module].name == "__init__.py":
            continue
        floor, room = room_of(module)
        for imported in imports:
            if not imported.startswith("service.") or MODULES[imported].name == "__init__.py":
                continue
            their_floor, their_room = room_of(imported)
            if their_floor > floor or (their_floor == floor and their_room != room):
                broken.append(f"{module} ({room}) imports {imported} ({their_room})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("package", ["camcore", "service.inference", "service.decoding", "service.fronts"])
def test_inference_decoding_and_camcore_know_no_http(package):
    users = top_levels(package.split(".")[0])
    inside = {m for m in MODULES if m == package or m.startswith(package + ".")}
    web = {name: sorted(users[name] & inside) for name in WEB_FRAMEWORKS & set(users) if users[name] & inside}
    assert not web, f"{package} imports a web framework: {web}"
    rooms = {
        module: sorted(i for i in project_imports(module) if i.startswith(HTTP_ROOMS))
        for module in inside
        if any(i.startswith(HTTP_ROOMS) for i in project_imports(module))
    }
    assert not rooms, f"{package} imports the HTTP rooms: {rooms}"


def test_the_house_stays_small():
    """At most 8 modules directly in service/, and no module of the three packages over 350 lines."""
    top = sorted(path.name for path in (ROOT / "service").glob("*.py"))
    assert len(top) <= 8, top
    long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (n := len(path.read_text().splitlines())) > 350
    }
    assert not long, f"modules over 350 lines: {long}"


def test_grpc_front_knows_no_http():
    """gRPC shares what lies below the HTTP layer (service/fronts/), never the HTTP layer itself."""
    inside = {m for m in MODULES if m.startswith("service.grpc.")}
    assert "service.grpc.server" in inside  # the room is really read
    users = top_levels("service")
    web = {name: sorted(users[name] & inside) for name in WEB_FRAMEWORKS & set(users) if users[name] & inside}
    assert not web, f"service.grpc imports a web framework: {web}"
    http = {m: sorted(i for i in project_imports(m) if i.startswith("service.http")) for m in inside}
    assert not any(http.values()), f"service.grpc imports the HTTP layer: {http}"

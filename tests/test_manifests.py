"""docker/check_manifests.py (run by ``make lint``): the shipped manifests pass, and broken ones do not."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (dev extra)")

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_manifests", ROOT / "docker" / "check_manifests.py")
check_manifests = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_manifests)


def load(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "docker" / name).read_text()) if d]


def test_shipped_manifests_are_valid():
    assert check_manifests.check(check_manifests.MANIFESTS) == []


def _runtime_container(docs):
    return docs[0]["spec"]["containers"][0]


BROKEN: list[tuple[str, str, Callable[[list[dict]], None], str]] = [
    ("kserve.yaml", "protocol v3", lambda d: d[0]["spec"].update(protocolVersions=["v3"]), "protocolVersions.0"),
    ("kserve.yaml", "misspelt probe", lambda d: _runtime_container(d).update(readinesProbe={}), "readinesProbe"),
    (
        "kserve.yaml",
        "probe path not served",
        lambda d: _runtime_container(d)["readinessProbe"]["httpGet"].update(path="/v2/ready"),
        "/v2/ready is not served",
    ),
    (
        "kserve.yaml",
        "probe on another port",
        lambda d: _runtime_container(d)["livenessProbe"]["httpGet"].update(port=9000),
        "port 9000 is not a container port",
    ),
    (
        "kserve.yaml",
        "unknown setting",
        lambda d: _runtime_container(d)["env"].append({"name": "CAMSERVE_THREADS", "value": "2"}),
        "CAMSERVE_THREADS is not a camserve setting",
    ),
    (
        "kserve.yaml",
        "protocol the runtime does not speak",
        lambda d: d[1]["spec"]["predictor"]["model"].update(protocolVersion="v1"),
        "not one the runtime speaks",
    ),
    (
        "kserve.yaml",
        "service not named as the bundle",
        lambda d: d[1]["metadata"].update(name="resnet"),
        "the bundle is",
    ),
    (
        "kserve.yaml",
        "unknown predictor field",
        lambda d: d[1]["spec"]["predictor"].update(replicas=3),
        "Additional properties",
    ),
    (
        "kserve.yaml",
        "bad scale metric",
        lambda d: d[1]["spec"]["predictor"].update(scaleMetric="gpu"),
        "scaleMetric",
    ),
    (
        "k8s.yaml",
        "gRPC probe on the HTTP port",
        lambda d: d[0]["spec"]["template"]["spec"]["containers"][0].update(readinessProbe={"grpc": {"port": 8000}}),
        "not CAMSERVE_GRPC_PORT",
    ),
    (
        "kserve.yaml",
        "gRPC runtime without an h2c port",
        lambda d: d[2]["spec"]["containers"][0]["ports"][0].update(name="grpc2"),
        "no port named h2c",
    ),
    (
        "k8s.yaml",
        "gRPC port not the setting",
        lambda d: d[0]["spec"]["template"]["spec"]["containers"][0]["ports"][1].update(containerPort=9001),
        "is not CAMSERVE_GRPC_PORT",
    ),
    (
        "k8s.yaml",
        "deployment typo",
        lambda d: d[0]["spec"]["template"]["spec"].update(container=[]),
        "container",
    ),
]


@pytest.mark.parametrize(("name", "what", "mutate", "expected"), BROKEN, ids=[b[1] for b in BROKEN])
def test_broken_manifests_are_refused(tmp_path, name, what, mutate, expected):
    docs = copy.deepcopy(load(name))
    mutate(docs)
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    errors = check_manifests.check([path])
    assert any(expected in line for line in errors), errors

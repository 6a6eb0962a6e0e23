"""The one model the protocol serves, named as the bundle (``cifar10-resnet`` for the shipped one), version
its weights' sha256, and its metadata."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from service.inference.contract import Engine
from service.oip.tensors import SIZE
from service.state import ServiceState

PREFIX = "/v2"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def serving(state: ServiceState, name: str, version: str | None = None) -> Engine:
    """The engine that answers ``name`` (and ``version``, when the path names one), else 404."""
    engine = state.engine
    bundle = engine.bundle
    if name != bundle.name:
        raise HTTPException(404, f"unknown model {name!r}; this server serves {bundle.name!r}")
    if version is not None and version != bundle.version:
        raise HTTPException(404, f"model {name!r} has no version {version!r}; serving {bundle.version}")
    return engine


def metadata(engine: Engine) -> dict[str, Any]:
    bundle = engine.bundle
    return {
        "name": bundle.name,
        "versions": [bundle.version],
        "platform": "pytorch",
        "inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, SIZE, SIZE, 3]},
        ],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(bundle.classes)]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ],
    }

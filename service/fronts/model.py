"""The Open Inference Protocol's models, for every front: the bundle's classifier, named as the bundle
(``cifar10-resnet`` for the shipped one), and its explanations, ``<bundle name>-cam``; both version the
weights' sha256, both are answered by the one engine serving now.

The classifier's inputs are ``image`` (BYTES [-1]) or ``pixels`` (UINT8 [-1, 32, 32, 3]); its outputs
``probabilities`` (FP32 [-1, classes]) and ``label`` (BYTES [-1]). The explanation model takes the same
inputs and an optional ``target`` (INT32 [-1], -1: the predicted class), the request parameters ``layer``,
``method`` and ``faithfulness`` (their allowed values in its metadata), and answers ``heatmap`` (FP32
[-1, 32, 32], the maps ``/gradcam`` answers), ``label``, ``probability`` and, with ``faithfulness=road``,
``road`` (FP32 [-1]).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from camcore.cam_methods import DEFAULT_METHOD, METHODS
from service.fronts.tensors import SIZE
from service.inference.contract import Engine
from service.state import ServiceState

CAM_SUFFIX = "-cam"
FAITHFULNESS = ("road",)
Kind = Literal["predict", "explain"]


class UnknownModel(LookupError):
    """No such model, or not that version: HTTP 404, gRPC NOT_FOUND."""


@dataclass(frozen=True)
class Served:
    """A model of the repository as one request sees it: which of the two, answered by which engine."""

    kind: Kind
    name: str
    engine: Engine

    @property
    def version(self) -> str:
        return self.engine.bundle.version


def model_names(engine: Engine) -> dict[str, Kind]:
    name = engine.bundle.name
    return {name: "predict", name + CAM_SUFFIX: "explain"}


def resolve(engine: Engine, name: str, version: str | None = None) -> Served:
    """The model ``name`` (and ``version``, when one is asked; empty means the one served), else UnknownModel."""
    names = model_names(engine)
    if name not in names:
        raise UnknownModel(f"unknown model {name!r}; this server serves {' and '.join(map(repr, names))}")
    if version and version != engine.bundle.version:
        raise UnknownModel(f"model {name!r} has no version {version!r}; serving {engine.bundle.version}")
    return Served(names[name], name, engine)


def serving(state: ServiceState, name: str, version: str | None = None) -> Served:
    """:func:`resolve` against the engine serving now (read once: the request keeps it through a reload)."""
    return resolve(state.engine, name, version)


def repository_index(engine: Engine) -> list[dict[str, str]]:
    """Triton's repository index: both models, ready."""
    return [
        {"name": name, "version": engine.bundle.version, "state": "READY", "reason": ""} for name in model_names(engine)
    ]


def _tensor(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape}


IMAGE_INPUTS = [_tensor("image", "BYTES", [-1]), _tensor("pixels", "UINT8", [-1, SIZE, SIZE, 3])]


def cam_parameters(engine: Engine) -> dict[str, dict[str, Any]]:
    """The explanation model's request parameters: each one's allowed values and its default."""
    return {
        "layer": {"allowed": list(engine.model.blocks), "default": engine.bundle.default_cam_layer},
        "method": {"allowed": list(METHODS), "default": DEFAULT_METHOD},
        "faithfulness": {"allowed": list(FAITHFULNESS), "default": None},
    }


def metadata(served: Served) -> dict[str, Any]:
    """The model's metadata in the protocol's shape (REST's JSON; gRPC copies it into its message)."""
    bundle = served.engine.bundle
    head = {"name": served.name, "versions": [bundle.version], "platform": "pytorch"}
    if served.kind == "predict":
        return {
            **head,
            "inputs": IMAGE_INPUTS,
            "outputs": [
                _tensor("probabilities", "FP32", [-1, len(bundle.classes)]),
                _tensor("label", "BYTES", [-1]),
            ],
        }
    return {
        **head,
        "inputs": [*IMAGE_INPUTS, _tensor("target", "INT32", [-1])],
        "outputs": [
            _tensor("heatmap", "FP32", [-1, SIZE, SIZE]),
            _tensor("label", "BYTES", [-1]),
            _tensor("probability", "FP32", [-1]),
            _tensor("road", "FP32", [-1]),
        ],
        "parameters": cam_parameters(served.engine),
    }

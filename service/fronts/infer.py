"""What the two models answer, for every front: the classifier's probabilities and labels through
``/predict``'s batcher, the explanation model's heatmaps through ``/gradcam``'s, its request parameters
and ``target`` input checked here, so REST and gRPC accept and answer exactly the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from camcore.cam_methods import METHODS
from service.fronts import gate
from service.fronts.model import FAITHFULNESS
from service.fronts.tensors import TensorError, check_shape
from service.inference.contract import Engine
from service.inference.jobs import GradcamJob
from service.inference.registry import pin
from service.state import ServiceState

PREDICT_OUTPUTS = ("probabilities", "label")
EXPLAIN_OUTPUTS = ("heatmap", "label", "probability", "road")
TRANSPORT_PARAMETERS = frozenset({"binary_data_output"})  # REST's binary extension: not the model's business


@dataclass(frozen=True)
class Classified:
    probabilities: np.ndarray  # float32 (images, classes)
    labels: list[str]


@dataclass(frozen=True)
class CamOptions:
    layer: str
    method: str
    road: bool


@dataclass(frozen=True)
class Explained:
    heatmaps: np.ndarray  # float32 (images, H, W): the maps /gradcam answers
    labels: list[str]  # the predicted class of each image, as /gradcam's "label"
    probabilities: np.ndarray  # float32 (images,): the predicted class's probability, as /gradcam's "probability"
    road: np.ndarray | None  # float32 (images,): ROAD scores, with faithfulness=road


async def classify(state: ServiceState, engine: Engine, images: list[torch.Tensor]) -> Classified:
    rows = await gate.submit(state, "predict", pin(engine, images))
    probabilities = np.stack(rows).astype(np.float32, copy=False)
    classes = engine.bundle.classes
    return Classified(probabilities, [classes[i] for i in probabilities.argmax(axis=1).tolist()])


def cam_options(engine: Engine, parameters: Mapping[str, Any]) -> CamOptions:
    """The explanation model's request parameters, each a string: ``layer``, ``method``, ``faithfulness``."""
    unknown = sorted(set(parameters) - {"layer", "method", "faithfulness"} - TRANSPORT_PARAMETERS)
    if unknown:
        raise TensorError(f"unknown parameter(s) {unknown}; this model takes 'layer', 'method' and 'faithfulness'")
    for key in ("layer", "method", "faithfulness"):
        if key in parameters and not isinstance(parameters[key], str):
            raise TensorError(f"parameter '{key}' must be a string")
    layers = list(engine.model.blocks)
    layer = parameters.get("layer") or engine.bundle.default_cam_layer
    if layer not in layers:
        raise TensorError(f"unknown layer {layer!r}; valid layers: {layers}")
    method = parameters.get("method") or "gradcam"
    if method not in METHODS:
        raise TensorError(f"unknown method {method!r}; valid methods: {list(METHODS)}")
    faithfulness = parameters.get("faithfulness") or None
    if faithfulness is not None and faithfulness not in FAITHFULNESS:
        raise TensorError(f"unknown faithfulness {faithfulness!r}; valid: {list(FAITHFULNESS)}")
    return CamOptions(layer, method, faithfulness == "road")


def targets(values: Sequence[int] | np.ndarray | None, shape: Sequence[int] | None, count: int, classes: int) -> list:
    """The ``target`` input (INT32 [-1], one per image; -1: the predicted class) as class indices or None;
    absent: every image's predicted class."""
    if values is None:
        return [None] * count
    check_shape("target", list(shape or []), [count])
    numbers = np.asarray(values).ravel()
    if numbers.size != count:
        raise TensorError(f"input 'target': {numbers.size} values for {count} image(s)")
    out: list[int | None] = []
    for value in numbers.tolist():
        if value == -1:
            out.append(None)
        elif 0 <= value < classes:
            out.append(int(value))
        else:
            raise TensorError(f"input 'target': {value} is not a class index 0..{classes - 1} nor -1 (predicted)")
    return out


def wanted_outputs(requested: Sequence[str] | None, options: CamOptions | None) -> list[str]:
    """The outputs to answer, in order: those asked for, or every one the request produces."""
    if options is None:
        available: tuple[str, ...] = PREDICT_OUTPUTS
    else:
        available = EXPLAIN_OUTPUTS if options.road else EXPLAIN_OUTPUTS[:-1]
    if requested is None or not requested:
        return list(available)
    if options is not None and "road" in requested and not options.road:
        raise TensorError("output 'road' needs the request parameter faithfulness='road'")
    unknown = [name for name in requested if name not in available]
    if unknown:
        raise TensorError(f"unknown output(s) {unknown}; this model has {list(available)}")
    return list(requested)


async def explain(
    state: ServiceState, engine: Engine, images: list[torch.Tensor], target: list, options: CamOptions
) -> Explained:
    jobs = [
        GradcamJob(image, options.layer, t, options.method, options.road)
        for image, t in zip(images, target, strict=True)
    ]
    rows = await gate.submit(state, "gradcam", pin(engine, jobs))
    probabilities = torch.stack([row.probabilities for row in rows]).numpy().astype(np.float32, copy=False)
    predicted = probabilities.argmax(axis=1)
    classes = engine.bundle.classes
    return Explained(
        heatmaps=torch.stack([row.heatmap for row in rows]).numpy().astype(np.float32, copy=False),
        labels=[classes[i] for i in predicted.tolist()],
        probabilities=probabilities[np.arange(len(rows)), predicted],
        road=np.array([row.road for row in rows], dtype=np.float32) if options.road else None,
    )

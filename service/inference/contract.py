"""The engine contract: what every engine (torch, OpenVINO, null) offers.

An engine is one bundle at one precision on one device. Its batch functions run on the model threads
(:mod:`service.inference.batcher`), never on the event loop, and two lanes may call them at once, so
they keep no per-batch state. The batchers reach them through a :data:`BatchFunction`, a callable
chosen when the batcher is registered (:mod:`service.inference.registry`), never a method name.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from torch import nn

from camcore.bundle import Bundle
from service.inference.jobs import GradcamJob, GradcamRow, PredictJob, PredictRow


@runtime_checkable
class Engine(Protocol):
    """One bundle, ready to answer batches. Attributes are read by /health, the logs and the metrics."""

    bundle: Bundle
    model: nn.Module  # the network, for its named blocks (Grad-CAM layers and their geometry)
    runtime: str  # what runs /predict's forward, with its version: "torch 2.14.1", "openvino 2026.4.1", "null"
    runtime_reason: str  # why that runtime: a setting, or what auto found (service/inference/choice.py)
    tta: str  # test-time augmentation of the served probabilities: "none" or "flip"
    precision: str  # of /predict: "fp32", "bf16", "fp16", "int8"
    precision_reason: str  # why this precision: measured timings, a setting, ...
    trace_reason: str  # how /predict's forward runs: "on", "off (...)"

    @property
    def device_name(self) -> str: ...

    @property
    def compiled(self) -> bool:
        """Whether /predict runs a compiled (traced) forward rather than eager torch."""
        ...

    def predict(self, images: list[PredictJob]) -> list[PredictRow]: ...

    def gradcam(self, jobs: list[GradcamJob]) -> list[GradcamRow]: ...

    def warm_up(self) -> None:
        """Pay one-off costs (kernel selection, allocator growth) before the first request."""
        ...


Job = TypeVar("Job")
Row = TypeVar("Row")
BatchFunction = Callable[[Engine, list[Job]], Sequence[Row]]


def run_predict(engine: Engine, images: list[PredictJob]) -> list[PredictRow]:
    return engine.predict(images)


def run_gradcam(engine: Engine, jobs: list[GradcamJob]) -> list[GradcamRow]:
    return engine.gradcam(jobs)

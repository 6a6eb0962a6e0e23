"""What the HTTP rooms need from the running service: created by the app factory, filled in by its lifespan."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from camcore.bundle import Bundle
from service.decoding.pool import Decoder
from service.inference.batcher import DynamicBatcher
from service.inference.contract import Engine
from service.inference.registry import EngineRegistry
from service.metrics import ServiceMetrics
from service.settings import Settings


class WorkerView(Protocol):
    """One worker process of several, as the app sees it (``service.runtime.slots.WorkerSlot``)."""

    total_queue_size: int

    def describe(self) -> dict[str, Any]: ...

    def ask_others_to_reload(self) -> None: ...


@dataclass
class ServiceState:
    """Everything the routes need; created by the factory, filled in by the lifespan."""

    settings: Settings
    metrics: ServiceMetrics
    registry: EngineRegistry
    # One batcher per endpoint that queues images, by name ("predict", "gradcam"); payloads are
    # service.inference.registry.Pinned jobs.
    batchers: dict[str, DynamicBatcher[Any, Any]] = field(default_factory=dict)
    decoder: Decoder | None = None  # decode threads and this process's decode memory budget
    lanes: int = 1  # batches that can run at once, each on its own model thread
    torch_threads: int = 1  # intra-op threads per batch
    ready: bool = False
    draining: bool = False
    worker: WorkerView | None = None  # one worker process of several (CAMSERVE_WORKERS > 1); None: the only one

    # -- what serves now (service.inference.registry.Serving), read once per request -----------------
    @property
    def engine(self) -> Engine | None:
        return self.registry.current.engine if self.registry.current else None

    @property
    def bundle(self) -> Bundle | None:
        return self.registry.current.bundle if self.registry.current else None

    @property
    def misclassified(self) -> list[dict]:
        return self.registry.current.misclassified if self.registry.current else []

    @property
    def layers(self) -> list[dict]:
        return self.registry.current.layers if self.registry.current else []

    @property
    def executor(self) -> Executor | None:
        return self.registry.executor

    @property
    def device(self) -> torch.device | None:
        return self.registry.device

    @property
    def predict_batcher(self) -> DynamicBatcher[Any, Any]:
        return self.batchers["predict"]

    @property
    def gradcam_batcher(self) -> DynamicBatcher[Any, Any]:
        return self.batchers["gradcam"]

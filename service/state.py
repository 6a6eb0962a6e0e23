"""What the routes need from the running service: created by the app factory, filled in by its lifespan."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from camcore.bundle import Bundle
from service.batcher import DynamicBatcher
from service.decoding import Decoder
from service.engine import GradcamRow, InferenceEngine
from service.metrics import ServiceMetrics
from service.null_engine import NullEngine
from service.settings import Settings
from service.worker import WorkerSlot


@dataclass
class ServiceState:
    """Everything the routes need; created by the factory, filled in by the lifespan."""

    settings: Settings
    metrics: ServiceMetrics
    bundle: Bundle | None = None
    engine: InferenceEngine | NullEngine | None = None  # the one new requests are pinned to (service.reload)
    # Payloads are service.reload.Pinned[torch.Tensor] and Pinned[GradcamJob].
    predict_batcher: DynamicBatcher[Any, np.ndarray] | None = None  # rows: probabilities
    gradcam_batcher: DynamicBatcher[Any, GradcamRow] | None = None
    executor: Executor | None = None  # the model threads: batches, and reloads' build and warm-up
    device: torch.device | None = None
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one reload at a time
    decoder: Decoder | None = None  # decode threads and this process's decode memory budget
    misclassified: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # Grad-CAM targets and their geometry, for /health
    lanes: int = 1  # batches that can run at once, each on its own model thread
    torch_threads: int = 1  # intra-op threads per batch
    ready: bool = False
    draining: bool = False
    worker: WorkerSlot | None = None  # one worker process of several (CAMSERVE_WORKERS > 1); None: the only one

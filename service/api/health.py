"""``GET /health``: the model, its measured accuracy and calibration, Grad-CAM's layers, batching and workers,
assembled from the bundle's metadata and the running service."""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import APIRouter
from pydantic import ValidationError

from camcore.cam_methods import DEFAULT_METHOD, METHODS
from service.api.render import colormap_lut
from service.api.schemas import CamFaithfulness, Health
from service.http.admission import State, readiness
from service.state import ServiceState

router = APIRouter()
log = logging.getLogger("camserve.routes")


def calibration_info(meta: dict[str, Any]) -> dict[str, Any] | None:
    """model.json's calibration record as /health reports it; None for a bundle never calibrated."""
    record = meta.get("calibration")
    if not isinstance(record, dict):
        return None
    return {
        "temperature": record.get("temperature", 1.0),
        "fitted_for_tta": record.get("fitted_for_tta"),
        "fitted_on_images": (record.get("fitted_on") or {}).get("images"),
        "ece_bins": record.get("ece_bins"),
        "test": record.get("test") or {},
    }


def served_test_accuracy(meta: dict[str, Any], tta: str) -> float | None:
    """The test accuracy of what this server answers: under flip TTA a temperature can tip the mean of the
    two views for a few images, so a calibrated bundle's own after-temperature figure wins."""
    after = meta.get("calibration", {}).get("test", {}).get(tta, {}).get("after", {}).get("accuracy")
    if after is not None:
        return after
    return meta.get("test_accuracy_flip_tta" if tta == "flip" else "test_accuracy")


def _cam_faithfulness(meta: dict[str, Any]) -> dict[str, Any] | None:
    """The bundle's ROAD table (``bench/cam_faithfulness.py``), or None when it has none. load_bundle refuses a
    malformed one (camcore/bundle_schema.py); the fallback stays so that nothing in model.json takes /health
    down, whoever built the Bundle."""
    record = meta.get("cam_faithfulness")
    if record is None:
        return None
    try:
        return CamFaithfulness.model_validate(record).model_dump()
    except ValidationError:
        log.warning("model.json: 'cam_faithfulness' does not match the schema; not shown in /health")
        return None


@router.get("/health", response_model=Health, summary="Model, accuracy, device and batching")
async def health(state: State) -> dict[str, Any]:
    meta = state.bundle.metadata
    engine = state.engine
    settings = state.settings
    return {
        "status": "ok",
        "device": engine.device_name,
        "runtime": engine.runtime,
        "runtime_reason": engine.runtime_reason,
        "precision": engine.precision,
        "precision_reason": engine.precision_reason,
        "test_time_augmentation": engine.tta,
        "model": {
            "name": meta.get("name", "model"),
            "version": state.bundle.version,
            "architecture": meta["architecture"],
            "parameters": meta.get("parameters", 0),
            "classes": state.bundle.classes,
            "test_accuracy": meta.get("test_accuracy"),
            "test_accuracy_flip_tta": meta.get("test_accuracy_flip_tta"),
            "served_test_accuracy": served_test_accuracy(meta, engine.tta),
            "val_accuracy": meta.get("val_accuracy"),
            "per_class_accuracy": meta.get("per_class_accuracy", {}),
            "trained_epochs": meta.get("trained_epochs"),
            "training_seconds": meta.get("training_seconds"),
            "hardware": meta.get("hardware"),
            "dataset": meta.get("dataset"),
            "calibration": calibration_info(meta),
        },
        "gradcam": {
            "layers": state.layers,
            "default_layer": state.bundle.default_cam_layer,
            "methods": list(METHODS),
            "default_method": DEFAULT_METHOD,
            "faithfulness": _cam_faithfulness(meta),
            "colormap": colormap_lut(),
        },
        "batching": {
            "max_batch_size": settings.max_batch_size,
            "max_wait_ms": settings.max_wait_ms,
            "queue_size": state.worker.total_queue_size if state.worker else settings.queue_size,
            "model_lanes": state.lanes,
            "torch_threads": state.torch_threads,
            "traced": engine.compiled,
        },
        "workers": _workers(state),
    }


def _workers(state: ServiceState) -> dict[str, Any]:
    """The service's worker processes; one process: itself."""
    if state.worker is not None:
        return state.worker.describe()
    status = readiness(state)
    slot = {"index": 0, "pid": os.getpid(), "status": status, "queue_size": state.settings.queue_size}
    return {
        "count": 1,
        "ready": int(status == "ready"),
        "this_worker": 0,
        "queue_size": slot["queue_size"],
        "slots": [slot],
    }

"""The protocol's models over REST (service/fronts/model.py: the bundle's classifier and its
explanations, ``<bundle name>-cam``): resolved by name and version, or 404."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException

from service.fronts.model import Served, UnknownModel
from service.fronts.model import metadata as model_metadata
from service.fronts.model import serving as serving_model
from service.inference.contract import Engine
from service.state import ServiceState

PREFIX = "/v2"
EXTENSIONS = ["binary_tensor_data", "model_repository"]


def served(state: ServiceState, name: str, version: str | None = None) -> Served:
    """The model ``name`` (and ``version``, when the path names one), else 404."""
    try:
        return serving_model(state, name, version)
    except UnknownModel as exc:
        raise HTTPException(404, str(exc)) from None


def serving(state: ServiceState, name: str, version: str | None = None) -> Engine:
    """The engine that answers ``name`` (either model of the repository), else 404."""
    return served(state, name, version).engine


def metadata(engine: Engine) -> dict[str, Any]:
    """The classifier's metadata (the explanation model's routes answer their own: service/oip/explain.py)."""
    return model_metadata(Served("predict", engine.bundle.name, engine))

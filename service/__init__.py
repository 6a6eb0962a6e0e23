"""camserve's HTTP service. ``create_app`` is imported lazily so that ``service.network`` and
``service.bundle`` stay importable (by the training job) without loading FastAPI."""

from __future__ import annotations

from typing import Any

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from service.app import create_app

        return create_app
    raise AttributeError(name)

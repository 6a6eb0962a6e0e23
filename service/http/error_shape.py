"""The two shapes of an error body: ``{"detail": ...}`` for camserve's JSON API, ``{"error": "..."}`` under
the Open Inference Protocol's ``/v2``. Beneath every writer of errors (handlers, middleware, connection)."""

from __future__ import annotations

import json
from typing import Any

OIP_PREFIX = "/v2"


def is_protocol_path(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def error_content(path: str, message: Any) -> dict[str, Any]:
    if is_protocol_path(path):
        return {"error": message if isinstance(message, str) else json.dumps(message)}
    return {"detail": message}


def error_body(path: str, message: str) -> bytes:
    """The JSON body of an error for ``path``: for answers written below the app (middleware, connection)."""
    return json.dumps(error_content(path, message)).encode()

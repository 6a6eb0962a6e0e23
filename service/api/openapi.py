"""The values the JSON API accepts that depend on the bundle and the settings, written into the OpenAPI document.

FastAPI builds the document from the routes, before any model is loaded, so on its own it says "a
string" where the service accepts one of the bundle's layers or classes, and "at least one" where it
takes at most ``CAMSERVE_MAX_FILES`` files. A client generated from it (or schemathesis, issue 24)
would send values the service must refuse. :func:`document_limits` fills them in from the model now
serving, each time the document is served (a reload can change them).
"""

from __future__ import annotations

from typing import Any

from service.state import ServiceState

UPLOAD_PATHS = ("/predict", "/gradcam")


def _parameter(operation: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((p for p in operation.get("parameters", []) if p.get("name") == name), None)


def _restrict(parameter: dict[str, Any] | None, schema: dict[str, Any]) -> None:
    if parameter is not None:
        kept = {key: value for key, value in parameter.get("schema", {}).items() if key in ("title", "description")}
        parameter["schema"] = {**kept, **schema}


def document_limits(schema: dict[str, Any], state: ServiceState) -> None:
    paths = schema.get("paths", {})
    engine = state.engine
    for path in UPLOAD_PATHS:
        body = paths.get(path, {}).get("post", {}).get("requestBody", {})
        form = body.get("content", {}).get("multipart/form-data", {}).get("schema", {})
        files = form.get("properties", {}).get("files")
        if files is not None:
            files["maxItems"] = state.settings.max_files
    gradcam = paths.get("/gradcam", {}).get("post")
    if gradcam is not None:
        classes = list(engine.bundle.classes)
        _restrict(_parameter(gradcam, "layer"), {"type": "string", "enum": list(engine.model.blocks)})
        targets = [*classes, *(str(i) for i in range(len(classes)))]
        _restrict(_parameter(gradcam, "target"), {"type": "string", "enum": targets})
    misclassified = paths.get("/misclassified", {}).get("get")
    total = len(state.misclassified)
    if misclassified is not None and total:
        _restrict(
            _parameter(misclassified, "n"),
            {"type": "integer", "minimum": 1, "maximum": total, "default": min(12, total)},
        )

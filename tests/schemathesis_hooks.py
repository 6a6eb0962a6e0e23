"""What JSON Schema cannot say about camserve's requests, told to schemathesis (issue 24).

The OpenAPI document says everything a schema can: required fields, counts, enums, ranges, the
bundle's layers and classes, the image limit. Three rules are beyond it, and stated in its
descriptions instead; schemathesis' positive cases (the requests it promises are valid) follow them
through these hooks, and its negative cases are left alone:

* an uploaded file, a raw body or an ``image`` tensor element is an image file, not any bytes
  (``format: binary`` and ``format: byte`` cannot say "a PNG");
* an Open Inference Protocol tensor's first dimension is the number of images in its ``data``;
* ``/gradcam?format=png`` answers with one image, so it takes one file.

Used by tests/test_schema.py (in process) and by the documented command (README, "API schema"):

    PYTHONPATH=tests SCHEMATHESIS_HOOKS=schemathesis_hooks schemathesis run http://127.0.0.1:8000/openapi.json \\
        --checks all --exclude-checks ignored_auth
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

INFER = "/v2/models/{name}/infer"
FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/webp": "WEBP", "image/bmp": "BMP", "image/gif": "GIF"}


def _image(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


IMAGES = [_image(fmt, seed) for fmt in FORMATS.values() for seed in range(3)]
# Every `format: binary` (a file part, a raw body) and `format: byte` (an `image` element) is an image file.
schemathesis.openapi.format("binary", st.sampled_from(IMAGES))
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(data).decode() for data in IMAGES]))


def _consistent_tensor(tensor: dict[str, Any]) -> None:
    data, shape = tensor.get("data"), tensor.get("shape")
    if isinstance(data, list) and isinstance(shape, list) and shape:
        shape[0] = len(data)


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    meta = getattr(case, "meta", None)
    if meta is None or not meta.generation.mode.is_positive:
        return case
    path = case.operation.path
    if path == INFER and isinstance(case.body, dict):
        for tensor in case.body.get("inputs") or []:
            if isinstance(tensor, dict):
                _consistent_tensor(tensor)
    if path == "/gradcam" and (case.query or {}).get("format") == "png" and isinstance(case.body, dict):
        files = case.body.get("files")
        if isinstance(files, list) and len(files) > 1:
            case.body["files"] = files[:1]
    return case

"""The images of a request body, read and decoded: one raw image (``Content-Type: image/*``) or the
``files`` of a multipart form, each priced, budgeted and decoded off the loop (:mod:`service.decoding`).

Both the FastAPI routes (:func:`read_request_images`) and the front's direct routes (which read the
ASGI messages themselves) come through :func:`read_images`, so a body means the same either way.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, MutableMapping
from typing import Any

import torch
from fastapi import Request

from service.http.raw_body import is_raw_image, read_raw_image
from service.http.uploads import read_uploads
from service.state import ServiceState


async def read_images(
    state: ServiceState,
    content_type: str,
    disposition: str | None,
    chunks: AsyncIterable[bytes],
    request_state: MutableMapping[str, Any],
) -> tuple[list[str], list[torch.Tensor]]:
    """(filenames, uint8 images) in the order sent; the count goes into the request's log line (``request_state``)."""
    settings = state.settings
    if is_raw_image(content_type):
        files = await read_raw_image(disposition, chunks)
    else:
        limits = {"max_files": settings.max_files, "max_bytes": settings.max_upload_bytes}
        files = await read_uploads(content_type, chunks, **limits)
    images = await state.decoder.decode(files)
    request_state["images"] = len(images)
    return [name for name, _ in files], images


async def read_request_images(request: Request, state: ServiceState) -> tuple[list[str], list[torch.Tensor]]:
    """:func:`read_images` of a FastAPI route's request."""
    headers = request.headers
    return await read_images(
        state,
        headers.get("content-type", ""),
        headers.get("content-disposition"),
        request.stream(),
        request.scope.setdefault("state", {}),
    )

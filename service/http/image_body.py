"""The images of a request body, read and decoded: one raw image (``Content-Type: image/*``) or the
``files`` of a multipart form, each priced, budgeted and decoded off the loop (:mod:`service.decoding`)."""

from __future__ import annotations

import torch
from fastapi import Request

from service.http.raw_body import is_raw_image, read_raw_image
from service.http.uploads import read_uploads
from service.state import ServiceState


async def read_images(request: Request, state: ServiceState) -> tuple[list[str], list[torch.Tensor]]:
    """(filenames, uint8 images) in the order sent; the count goes into the request's log line."""
    settings = state.settings
    if is_raw_image(request.headers.get("content-type", "")):
        files = await read_raw_image(request)
    else:
        files = await read_uploads(request, max_files=settings.max_files, max_bytes=settings.max_upload_bytes)
    images = await state.decoder.decode(files)
    request.state.images = len(images)
    return [name for name, _ in files], images

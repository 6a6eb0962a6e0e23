"""Reading the ``files`` field of a multipart upload, with limits, into decoded images."""

from __future__ import annotations

import torch
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.images import decode_image

FIELD = "files"
# Small files (every CIFAR-sized image) decode faster than a hop to the thread pool costs.
INLINE_DECODE_BYTES = 64 * 1024

MULTIPART_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {
                        FIELD: {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, WebP, BMP, GIF)",
                        }
                    },
                }
            }
        },
    }
}


async def read_uploads(request: Request, *, max_files: int, max_bytes: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in ``files``, in the order sent."""
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise HTTPException(415, f"send images as multipart/form-data in the field '{FIELD}' (got {content_type!r})")
    try:
        form = await request.form(max_files=max_files, max_fields=32, max_part_size=max_bytes)
    except StarletteHTTPException as exc:  # Starlette's multipart errors
        if "Too many files" in str(exc.detail):
            raise HTTPException(413, f"too many files: at most {max_files} per request") from None
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from None
    try:
        uploads = form.getlist(FIELD)
        files = [u for u in uploads if isinstance(u, UploadFile)]
        if not files:
            raise HTTPException(422, f"no files: send one or more images in the multipart field '{FIELD}'")
        if len(files) != len(uploads):
            raise HTTPException(422, f"field '{FIELD}' must hold files, not text")
        return [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(files)]
    finally:
        await form.close()


async def decode_uploads(files: list[tuple[str, bytes]], *, max_pixels: int, max_frames: int) -> list[torch.Tensor]:
    images = []
    for name, data in files:
        if len(data) <= INLINE_DECODE_BYTES:
            images.append(decode_image(data, name, max_pixels=max_pixels, max_frames=max_frames))
        else:
            images.append(
                await run_in_threadpool(decode_image, data, name, max_pixels=max_pixels, max_frames=max_frames)
            )
    return images

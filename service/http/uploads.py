"""Reading the ``files`` field of a multipart upload, with limits; decoding is :mod:`service.decoding.pool`'s."""

from __future__ import annotations

from fastapi import HTTPException, Request
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

FIELD = "files"
MULTIPART = "multipart/form-data"
# What a file may be (each is decoded by its content, whatever its part says); also the raw body's types.
IMAGE_TYPES = ("image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif")

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
                            "minItems": 1,  # an empty form is refused (422): the schema says so
                            "items": {"type": "string", "format": "binary"},
                            "description": "one or more images (JPEG, PNG, WebP, BMP, GIF)",
                        }
                    },
                },
                "encoding": {FIELD: {"contentType": ", ".join(IMAGE_TYPES)}},
            }
        },
    }
}


async def read_uploads(request: Request, *, max_files: int, max_bytes: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in ``files``, in the order sent."""
    content_type = request.headers.get("content-type", "")
    if content_type.partition(";")[0].strip().lower() != MULTIPART:  # not a prefix: multipart/form-dataX is not it
        raise HTTPException(415, f"send images as {MULTIPART} in the field '{FIELD}' (got {content_type!r})")
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

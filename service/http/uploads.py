"""Reading the ``files`` field of a multipart upload, with limits (:mod:`service.http.multipart`);
decoding is :mod:`service.decoding.pool`'s."""

from __future__ import annotations

from collections.abc import AsyncIterable

from fastapi import HTTPException

from service.http.multipart import read_files

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


MAX_FIELDS = 32  # text fields a form may carry besides its files (none are read)


def is_multipart(content_type: str) -> bool:
    """Exactly ``multipart/form-data`` (any parameters): not a prefix, ``multipart/form-dataX`` is not it."""
    return content_type.partition(";")[0].strip().lower() == MULTIPART


async def read_uploads(
    content_type: str, chunks: AsyncIterable[bytes], *, max_files: int, max_bytes: int
) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every file in ``files``, in the order sent; 415 when the body is not a form."""
    if not is_multipart(content_type):
        raise HTTPException(415, f"send images as {MULTIPART} in the field '{FIELD}' (got {content_type!r})")
    return await read_files(
        content_type, chunks, field=FIELD, max_files=max_files, max_fields=MAX_FIELDS, max_part_size=max_bytes
    )

"""One image as the whole request body (``Content-Type: image/jpeg``, ``image/png``, ...).

Beside multipart (still the documented default, and the only way to send several images at once),
a raw body spares the server the multipart parser: no boundary scan, no form object, no spooled
temporary file per part, which is most of the per-request CPU of a small image
(bench/results/front_profile.md). The bytes are decoded exactly as a multipart file's are (by their
content, not by the declared type), so the answer is the same either way. The body's size and
arrival time are bounded by the same middleware as any other body.
"""

from __future__ import annotations

from fastapi import Request

from service.http.disposition import filename
from service.http.uploads import IMAGE_TYPES, MULTIPART_OPENAPI

DEFAULT_NAME = "image"
RAW_TYPES = IMAGE_TYPES

REQUEST_BODY_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            **MULTIPART_OPENAPI["requestBody"]["content"],
            **{
                media: {"schema": {"type": "string", "format": "binary", "description": "one image as the body"}}
                for media in RAW_TYPES
            },
        },
    }
}


def is_raw_image(content_type: str) -> bool:
    """``image/<anything>``: the body is one image (an unsupported format is refused when decoded)."""
    return content_type[:6].lower() == "image/"


def _filename(request: Request) -> str:
    """The name from an optional ``Content-Disposition: inline; filename="cat.jpg"``, for answers and errors."""
    disposition = request.headers.get("content-disposition")
    return (filename(disposition) if disposition else None) or DEFAULT_NAME


async def read_raw_image(request: Request) -> list[tuple[str, bytes]]:
    """The body as the one upload of this request: [(filename, bytes)]."""
    return [(_filename(request), await request.body())]

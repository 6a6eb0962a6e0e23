"""The lean multipart reader (service/http/multipart.py) against Starlette's ``request.form()``, which it
replaced: for every body below, fed in chunks of every small size, both give the same files or the same
refusal (status and message)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import HTTPException
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from service.http.uploads import FIELD, MAX_FIELDS, read_uploads

MAX_FILES = 4
MAX_BYTES = 2048
B = "xyzBOUNDARY"
TYPE = f"multipart/form-data; boundary={B}"


def part(disposition: str, data: bytes, part_type: str | None = "image/png") -> bytes:
    type_line = f"Content-Type: {part_type}\r\n" if part_type else ""
    return f"--{B}\r\nContent-Disposition: {disposition}\r\n{type_line}\r\n".encode() + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{B}--\r\n".encode()


def file(name: str, data: bytes, field: str = FIELD) -> bytes:
    return part(f'form-data; name="{field}"; filename="{name}"', data)


BODIES: dict[str, tuple[str, bytes]] = {
    "one file": (TYPE, form(file("a.png", b"\x89PNG data"))),
    "three files": (TYPE, form(file("a.png", b"1"), file("b.png", b"2" * 100), file("c.png", b"\r\n--x\r\n"))),
    "other fields are not read": (TYPE, form(part('form-data; name="note"', b"hi", None), file("a.png", b"1"))),
    "files in another field": (TYPE, form(file("x.png", b"1", field="other"), file("a.png", b"2"))),
    "only another field": (TYPE, form(file("x.png", b"1", field="other"))),
    "text in the field": (TYPE, form(file("a.png", b"1"), part(f'form-data; name="{FIELD}"', b"text", None))),
    "only text in the field": (TYPE, form(part(f'form-data; name="{FIELD}"', b"text", None))),
    "empty filename": (TYPE, form(file("", b"1"), file("", b"2"))),
    "utf-8 filename": (TYPE, form(file("chat-été.png", b"1"))),
    "latin-1 charset": (f"{TYPE}; charset=latin-1", form(file("caf\xe9.png", b"1"))),
    "unknown charset": (f"{TYPE}; charset=nope", form(file("a.png", b"1"))),
    "windows path": (TYPE, form(file("C:\\Users\\me\\cat.png", b"1"))),
    "quoted quote": (TYPE, form(part(f'form-data; name="{FIELD}"; filename="a\\"b.png"', b"1"))),
    "no name": (TYPE, form(part('form-data; filename="a.png"', b"1"))),
    "no disposition": (TYPE, form(b"--" + B.encode() + b"\r\nContent-Type: image/png\r\n\r\n1\r\n")),
    "too many files": (TYPE, form(*(file(f"{i}.png", b"1") for i in range(MAX_FILES + 1)))),
    "too many fields": (TYPE, form(*(part(f'form-data; name="f{i}"', b"1", None) for i in range(MAX_FIELDS + 1)))),
    "text part over the limit": (TYPE, form(part('form-data; name="note"', b"x" * (MAX_BYTES + 1), None))),
    "file part over the part limit": (TYPE, form(file("a.png", b"x" * (MAX_BYTES + 1)))),
    "no boundary": ("multipart/form-data", form(file("a.png", b"1"))),
    "wrong boundary": ("multipart/form-data; boundary=other", form(file("a.png", b"1"))),
    "garbage": (TYPE, b"this is not multipart at all"),
    "empty body": (TYPE, b""),
    "no closing boundary": (TYPE, file("a.png", b"1")),
    "boundary too long": (f"multipart/form-data; boundary={'b' * 300}", b"--" + b"b" * 300 + b"--\r\n"),
}


async def chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def starlette_reference(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """What read_uploads did before: Starlette's form, then the field's files (the old code, verbatim in kind)."""
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    scope["app"] = object()  # Starlette raises HTTPException (not MultiPartException) under an app
    request = Request(scope, receive)
    try:
        parsed = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_BYTES)
    except StarletteHTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise HTTPException(413, f"too many files: at most {MAX_FILES} per request") from None
        raise HTTPException(400, f"malformed multipart body: {exc.detail}") from None
    try:
        uploads = parsed.getlist(FIELD)
        files = [u for u in uploads if isinstance(u, UploadFile)]
        if not files:
            raise HTTPException(422, f"no files: send one or more images in the multipart field '{FIELD}'")
        if len(files) != len(uploads):
            raise HTTPException(422, f"field '{FIELD}' must hold files, not text")
        return [(upload.filename or f"file{i}", await upload.read()) for i, upload in enumerate(files)]
    finally:
        await parsed.close()


async def lean(content_type: str, body: AsyncIterator[bytes]) -> list[tuple[str, bytes]]:
    return await read_uploads(content_type, body, max_files=MAX_FILES, max_bytes=MAX_BYTES)


async def outcome(reader, *args) -> tuple:
    try:
        return ("files", await reader(*args))
    except HTTPException as exc:
        return ("refused", exc.status_code, exc.detail)


@pytest.mark.parametrize("case", list(BODIES))
def test_the_lean_reader_answers_as_starlettes_form(case: str) -> None:
    content_type, body = BODIES[case]

    async def check() -> None:
        expected = await outcome(starlette_reference, content_type, body)
        for size in (1, 2, 3, 7, 64, max(1, len(body))):
            got = await outcome(lean, content_type, chunks(body, size))
            assert got == expected, (case, size)

    asyncio.run(check())


def test_a_body_that_is_not_a_form_is_415() -> None:
    async def check() -> None:
        with pytest.raises(HTTPException) as refused:
            await read_uploads("multipart/form-dataX; boundary=a", chunks(b"", 1), max_files=1, max_bytes=1)
        assert refused.value.status_code == 415

    asyncio.run(check())

"""The files of one field of a ``multipart/form-data`` body, parsed in memory as the body arrives.

python-multipart's streaming parser does the parsing, as under Starlette's ``request.form()``; what
differs is what is kept. Starlette builds a form of every part, each file in a ``SpooledTemporaryFile``
behind an ``UploadFile`` whose reads are coroutines, and closes them all afterwards: for a single
CIFAR-size image that bookkeeping cost more CPU than parsing it (bench/results/front_cost.md). Here
the parts of the one field the service reads are kept as bytes, and the rest are counted and dropped.

The limits and refusals are Starlette's (the same counts, the same messages), turned into the
service's answers: too many files 413; too many fields, a part without a name, a text part over
``max_part_size`` or a body python-multipart cannot parse 400 ("malformed multipart body: ...");
no file in the field, or text in it, 422. The body's own size limit is the front's
(service/http/body_limit.py), so a file part is bounded by it.
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterable

from fastapi import HTTPException
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header


class MalformedMultipart(Exception):
    """Starlette's ``MultiPartException``, with its message: answered 400 by :func:`read_files`."""


def _decode(data: bytes, charset: str) -> str:
    try:
        return data.decode(charset)
    except (UnicodeDecodeError, LookupError):
        return data.decode("latin-1")


class FieldFiles:
    """A parser for one body, keeping the files sent in ``field``: feed it chunks, then :meth:`files`."""

    def __init__(self, content_type: str, *, field: str, max_files: int, max_fields: int, max_part_size: int) -> None:
        _, params = parse_options_header(content_type)
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            self._charset = codecs.lookup(charset).name
        except LookupError:
            self._charset = "latin-1"
        self._field = field
        self._max_files, self._max_fields, self._max_part_size = max_files, max_fields, max_part_size
        self._files: list[tuple[str, bytes]] = []
        self._text_in_field = False
        self._file_count = self._field_count = 0
        # the part being parsed
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._chunks: list[bytes] = []
        self._size = 0
        self._name = ""
        self._filename: str | None = None
        try:
            boundary = params[b"boundary"]
        except KeyError:
            raise MalformedMultipart("Missing boundary in multipart.") from None
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": self._header_field,
            "on_header_value": self._header_piece,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
        }
        try:
            self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
        except FormParserError:
            raise MalformedMultipart("Invalid multipart data.") from None

    def feed(self, chunk: bytes) -> None:
        try:
            self._parser.write(chunk)
        except FormParserError:
            raise MalformedMultipart("Invalid multipart data.") from None

    def files(self) -> list[tuple[str, bytes]]:
        """(filename, bytes) of every file in the field, in the order sent; 422 when there is none, or text."""
        try:
            self._parser.finalize()
        except FormParserError:
            raise MalformedMultipart("Invalid multipart data.") from None
        if not self._files:
            raise HTTPException(422, f"no files: send one or more images in the multipart field '{self._field}'")
        if self._text_in_field:
            raise HTTPException(422, f"field '{self._field}' must hold files, not text")
        return self._files

    # -- python-multipart's callbacks --------------------------------------------------------------
    def _part_begin(self) -> None:
        self._disposition = b""
        self._chunks = []
        self._size = 0

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_piece(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        try:
            self._name = _decode(options[b"name"], self._charset)
        except KeyError:
            raise MalformedMultipart('The Content-Disposition header field "name" must be provided.') from None
        if b"filename" in options:
            self._file_count += 1
            if self._file_count > self._max_files:
                raise HTTPException(413, f"too many files: at most {self._max_files} per request")
            self._filename = _decode(options[b"filename"], self._charset)
        else:
            self._field_count += 1
            if self._field_count > self._max_fields:
                raise MalformedMultipart(f"Too many fields. Maximum number of fields is {self._max_fields}.")
            self._filename = None

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._filename is None:
            self._size += end - start
            if self._size > self._max_part_size:
                raise MalformedMultipart(f"Part exceeded maximum size of {int(self._max_part_size / 1024)}KB.")
        if self._name == self._field:
            self._chunks.append(data[start:end])

    def _part_end(self) -> None:
        if self._name != self._field:
            return
        if self._filename is None:
            self._text_in_field = True
        else:
            self._files.append((self._filename or f"file{len(self._files)}", b"".join(self._chunks)))
        self._chunks = []


async def read_files(
    content_type: str,
    chunks: AsyncIterable[bytes],
    *,
    field: str,
    max_files: int,
    max_fields: int,
    max_part_size: int,
) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the files in ``field`` of the body ``chunks``; an unparseable body is a 400."""
    try:
        parser = FieldFiles(
            content_type, field=field, max_files=max_files, max_fields=max_fields, max_part_size=max_part_size
        )
        async for chunk in chunks:
            parser.feed(chunk)
        return parser.files()
    except MalformedMultipart as exc:
        raise HTTPException(400, f"malformed multipart body: {exc}") from None

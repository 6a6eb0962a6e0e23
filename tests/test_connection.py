"""The bounded HTTP/1.1 protocol (service/http/connection.py) fed directly, in process: no socket, no server.

A chunked request's trailer fields arrive after the body has begun, where the protocol once counted
nothing: httptools builds a field's value by concatenation as its bytes arrive, so a trailer of
128 MiB cost 16.6 s of event-loop CPU (issue 24). Every byte that is neither body nor counted
elsewhere (the request head, chunk framing, the trailer) now counts against ``max_header_bytes``,
and every field, header or trailer, against ``max_headers``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from service.http.connection import BoundedHttpToolsProtocol, HttpLimits

LIMITS = HttpLimits(max_header_bytes=8192, max_headers=40, header_timeout_s=30, idle_timeout_s=30)
READ = 64 * 1024  # what one socket read hands the protocol at most (asyncio reads up to 256 KiB)


class Transport(asyncio.Transport):
    """What the protocol writes, and whether it closed the connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.written = bytearray()
        self.closed = False
        self.protocol: BoundedHttpToolsProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 40000)}.get(name, default)

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.written += data

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class EchoApp:
    """Reads the whole body, answers its length; records each request's headers."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.scopes.append(scope)
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = str(size).encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@pytest.fixture
async def connection(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(BoundedHttpToolsProtocol, "limits", LIMITS)
    app = EchoApp()
    loop = asyncio.get_running_loop()
    config = Config(app=app, lifespan="off", log_level="warning")
    protocol = BoundedHttpToolsProtocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)
    transport = Transport(loop)
    transport.protocol = protocol
    protocol.connection_made(transport)
    yield protocol, transport, app
    transport.close()
    await settle()  # the app's task sees the disconnect and ends


async def settle() -> None:
    """Let the app's task and the transport's callbacks run."""
    for _ in range(20):
        await asyncio.sleep(0)


def feed(protocol: BoundedHttpToolsProtocol, transport: Transport, data: bytes) -> int:
    """``data`` in socket-sized reads until the connection closes; the bytes it took."""
    taken = 0
    for start in range(0, len(data), READ):
        if transport.closed:
            break
        piece = data[start : start + READ]
        protocol.data_received(piece)
        taken += len(piece)
    return taken


HEAD = b"POST /upload HTTP/1.1\r\nHost: camserve\r\nTransfer-Encoding: chunked\r\n\r\n"


def chunks(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces) + b"0\r\n"


async def test_a_huge_trailer_is_refused_with_431_at_the_limit(connection) -> None:
    protocol, transport, _ = connection
    endless_trailer = HEAD + chunks(b"x" * 1000, 500) + b"X-Trailer: " + b"a" * (16 * 2**20)
    taken = feed(protocol, transport, endless_trailer)
    await settle()
    assert transport.closed
    assert transport.written.startswith(b"HTTP/1.1 431 "), bytes(transport.written[:200])
    assert b"trailer" in transport.written
    # Refused within a few reads of the limit, not after the 16 MiB were concatenated.
    assert taken <= LIMITS.max_header_bytes + 5 * READ


async def test_a_trailer_of_many_small_reads_is_counted(connection) -> None:
    """A trailer that trickles in: each read is small, their sum is what counts."""
    protocol, transport, _ = connection
    protocol.data_received(HEAD + chunks(b"y" * 10, 10) + b"X-Trailer: ")
    sent = 0
    while not transport.closed and sent < 1_000_000:
        protocol.data_received(b"a" * 100)
        sent += 100
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 431 "), bytes(transport.written[:200])
    assert sent <= LIMITS.max_header_bytes + 100


async def test_too_many_trailer_fields_get_431(connection) -> None:
    protocol, transport, _ = connection
    fields = b"".join(b"X-T%d: 1\r\n" % i for i in range(LIMITS.max_headers + 5))
    feed(protocol, transport, HEAD + chunks(b"z" * 10, 10) + fields + b"\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 431 "), bytes(transport.written[:200])
    assert transport.closed


async def test_a_small_trailer_is_accepted_and_not_merged_into_the_headers(connection) -> None:
    protocol, transport, app = connection
    feed(protocol, transport, HEAD + chunks(b"w" * 100, 30) + b"X-Checksum: abc\r\nAuthorization: x\r\n\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 "), bytes(transport.written[:200])
    assert transport.written.endswith(b"\r\n\r\n100")
    [scope] = app.scopes
    names = [name for name, _ in scope["headers"]]
    assert b"x-checksum" not in names and b"authorization" not in names  # trailers arrive after the checks
    assert not transport.closed  # keep-alive


@pytest.mark.parametrize("chunk", [1, 7, 4096])
async def test_a_large_body_in_many_chunks_is_not_mistaken_for_a_header(connection, chunk: int) -> None:
    """Chunk framing between body bytes is not a header: 64 KiB in one-byte chunks is 6x that on the wire."""
    protocol, transport, _ = connection
    body = bytes(range(256)) * 256
    feed(protocol, transport, HEAD + chunks(body, chunk) + b"\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 200 "), bytes(transport.written[:200])
    assert transport.written.endswith(b"\r\n\r\n" + str(len(body)).encode())


async def test_an_endless_chunk_extension_is_refused(connection) -> None:
    protocol, transport, _ = connection
    taken = feed(protocol, transport, HEAD + b"5;ext=" + b"e" * (4 * 2**20))
    await settle()
    assert transport.closed and taken <= LIMITS.max_header_bytes + 5 * READ
    assert transport.written.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), bytes(transport.written[:200])


async def test_headers_over_the_limit_still_get_431(connection) -> None:
    protocol, transport, _ = connection
    taken = feed(protocol, transport, b"GET / HTTP/1.1\r\nX-Filler: " + b"f" * (4 * 2**20))
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 431 ") and b"headers" in transport.written
    assert taken <= LIMITS.max_header_bytes + READ


async def test_pipelined_requests_each_get_the_full_limit(connection) -> None:
    protocol, transport, _ = connection
    one = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"f" * (LIMITS.max_header_bytes - 100) + b"\r\n\r\n"
    for _ in range(3):
        protocol.data_received(one)
        await settle()
    assert transport.written.count(b"HTTP/1.1 200 ") == 3 and not transport.closed


def head_of(written: bytes) -> list[bytes]:
    return written.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")


async def test_answers_written_by_the_connection_carry_nosniff_and_the_error_shape(connection) -> None:
    protocol, transport, _ = connection
    feed(protocol, transport, b"GET /v2/x HTTP/1.1\r\nX-Filler: " + b"f" * (2 * LIMITS.max_header_bytes))
    await settle()
    assert b"x-content-type-options: nosniff" in head_of(transport.written)
    assert transport.written.split(b"\r\n\r\n", 1)[1].startswith(b'{"error": ')


async def test_bytes_that_are_not_http_get_a_json_400_with_nosniff(connection) -> None:
    protocol, transport, _ = connection
    protocol.data_received(b"\x16\x03\x01 not http at all\r\n\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.closed
    assert b"x-content-type-options: nosniff" in head_of(transport.written)
    assert transport.written.split(b"\r\n\r\n", 1)[1].startswith(b'{"detail": ')


async def test_the_connection_caps_503_carries_nosniff(connection) -> None:
    protocol, transport, _ = connection
    protocol.limit_concurrency = 1  # this connection is the one the cap allows: any request is over it
    protocol.data_received(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
    await settle()
    assert transport.written.startswith(b"HTTP/1.1 503 "), bytes(transport.written[:200])
    head = head_of(transport.written)
    assert b"x-content-type-options: nosniff" in head and b"retry-after: 1" in head

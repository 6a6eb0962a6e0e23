"""A client that goes away while its images wait for the batcher (issue 24): its images that have not
started are dropped (``camserve_dropped_images``), its request is logged 499, and the next client does
not wait behind work nobody will read.

In process: the app is called as uvicorn calls it, with an ASGI ``receive`` that delivers the body and
then, when the test says so, ``http.disconnect`` (what uvicorn's receive returns once the connection is
lost). Then once against a real server whose client resets its connection (``@pytest.mark.server``).
The null engine (``CAMSERVE_ENGINE=null``) sleeps ``null_batch_ms`` per batch: one image per batch
and one lane make the queue's progress countable.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import camserve, scrape
from helpers import encode, random_image

from service.app import create_app
from service.settings import Settings

BATCH_MS = 300
IMAGES = 6
PNG = encode(random_image(0))
LONG_S = 60.0  # only there so that a failure cannot hang


def multipart(count: int) -> tuple[bytes, str]:
    files = [("files", (f"{i}.png", PNG, "image/png")) for i in range(count)]
    request = httpx.Request("POST", "http://camserve/", files=files)
    return request.read(), request.headers["content-type"]


def sample(app: Any, name: str, **labels: str) -> float:
    value = app.state.camserve.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + LONG_S
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


class LeavingClient:
    """An ASGI client that sends its body, then hangs up when :attr:`hang_up` is set."""

    def __init__(self, path: str, body: bytes, content_type: str) -> None:
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"host", b"camserve"),
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
            ],
            "client": ("127.0.0.1", 40000),
            "server": ("camserve", 80),
        }
        self.body = body
        self.sent_body = False
        self.hang_up = asyncio.Event()
        self.messages: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if not self.sent_body:
            self.sent_body = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.hang_up.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)


@pytest.fixture
async def app(bundle_dir: Path):
    settings = Settings(
        model_dir=bundle_dir,
        engine="null",
        null_batch_ms=BATCH_MS,
        max_batch_size=1,
        model_lanes=1,
        log_requests=True,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest.mark.parametrize("path", ["/predict", "/gradcam", "/v2/models/test-bundle/infer"])
async def test_a_client_that_leaves_has_its_queued_images_dropped(
    app: Any, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    if path.startswith("/v2"):
        data = [base64.b64encode(PNG).decode()] * IMAGES
        tensor = {"name": "image", "datatype": "BYTES", "shape": [IMAGES], "data": data}
        body, content_type = json.dumps({"inputs": [tensor]}).encode(), "application/json"
        endpoint = "/predict"  # the protocol's infer runs through /predict's batcher
    else:
        body, content_type = multipart(IMAGES)
        endpoint = path
    batcher = app.state.camserve.batchers[endpoint.strip("/")]
    leaving = LeavingClient(path, body, content_type)
    caplog.set_level(logging.INFO, logger="camserve.access")

    request = asyncio.create_task(app(leaving.scope, leaving.receive, leaving.send))
    await wait_for(lambda: batcher.depth and batcher.depth < IMAGES, "the first image never started")
    leaving.hang_up.set()
    await asyncio.wait_for(request, LONG_S)

    # Answered 499 at once (to nobody), not 200 after all six batches.
    assert [m["status"] for m in leaving.messages if m["type"] == "http.response.start"] == [499]
    # The next client is served without waiting for the five images nobody will read.
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://camserve") as client:
        files = [("files", ("next.png", PNG, "image/png"))]
        answer = await client.post(endpoint, files=files)
    assert answer.status_code == 200, answer.text
    ran = sample(app, "camserve_images_total", endpoint=endpoint)
    dropped = sample(app, "camserve_dropped_images_total", endpoint=endpoint)
    assert ran <= 3, ran  # the leaver's first one or two, and the next client's
    assert dropped >= IMAGES - 2 and ran - 1 + dropped == IMAGES, (ran, dropped)
    assert sample(app, "camserve_rejections_total", reason="client_disconnected") == 1
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "camserve.access"]
    assert [r["status"] for r in records] == [499, 200], records  # the leaver's, then the next client's


async def test_a_request_answered_before_the_client_leaves_is_logged_as_answered(app: Any, caplog) -> None:
    """The watch ends with the answer: a client that hangs up after it is no 499."""
    body, content_type = multipart(1)
    leaving = LeavingClient("/predict", body, content_type)
    caplog.set_level(logging.INFO, logger="camserve.access")
    await asyncio.wait_for(app(leaving.scope, leaving.receive, leaving.send), LONG_S)
    leaving.hang_up.set()
    await asyncio.sleep(0.01)
    assert [m["status"] for m in leaving.messages if m["type"] == "http.response.start"] == [200]
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "camserve.access"]
    assert [r["status"] for r in records] == [200]
    assert sample(app, "camserve_dropped_images_total", endpoint="/predict") == 0


async def test_a_slow_answer_outlives_the_body_deadline(bundle_dir: Path) -> None:
    """Waiting for the disconnect has no deadline: a request whose answer comes after the body timeout
    is answered, not refused with 408."""
    settings = Settings(model_dir=bundle_dir, engine="null", null_batch_ms=1500, body_timeout_s=1, log_requests=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=LONG_S) as client:
            answer = await client.post("/predict", files=[("files", ("a.png", PNG, "image/png"))])
    assert answer.status_code == 200, answer.text


@pytest.mark.server
def test_a_reset_connection_cancels_its_queued_images(bundle_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    settings = {"engine": "null", "null_batch_ms": BATCH_MS, "max_batch_size": 1, "model_lanes": 1}
    with camserve(bundle_dir, log, log_requests="true", **settings) as server:
        body, content_type = multipart(IMAGES)
        head = (
            f"POST /gradcam HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: leaver\r\n\r\n"
        ).encode()
        with socket.create_connection(server.address, timeout=LONG_S) as sock:
            sock.sendall(head + body)
            deadline = time.monotonic() + LONG_S
            gradcam = frozenset({("endpoint", "/gradcam")})
            while scrape(server.base_url).get(("camserve_images_total", gradcam)) is None:
                assert time.monotonic() < deadline, "the first image never ran"
                time.sleep(0.02)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        files = [("files", ("next.png", PNG, "image/png"))]
        answer = httpx.post(f"{server.base_url}/gradcam", files=files, timeout=LONG_S)
        assert answer.status_code == 200, answer.text
        samples = scrape(server.base_url)
        ran, dropped = samples[("camserve_images_total", gradcam)], samples[("camserve_dropped_images_total", gradcam)]
        # The next client's image ran after the leaver's first one or two: the rest were dropped unrun.
        assert dropped >= IMAGES - 2 and ran - 1 + dropped == IMAGES, (ran, dropped)
    records = [json.loads(line) for line in log.read_text().splitlines() if '"request_id": "leaver"' in line]
    assert [r["status"] for r in records] == [499], records

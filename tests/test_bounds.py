"""Issue 14's bounds, attacked as a client would, each while an honest client is being served.

Decode bombs of every kind are priced from their headers and refused with 413 before a pixel is
decoded; the decodes that are allowed run off the event loop within one memory budget; header floods
get 431; silent, half-sent and slow connections are closed at their deadlines; past the connection cap
a request gets 503. Real servers on loopback (``python -m service``) wherever the transport matters,
with short deadlines and small budgets set through ``CAMSERVE_*`` settings.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import Server, camserve, metric, multipart_body, scrape, wait_until, wait_until_async
from helpers import encode, gif_declaring, jpeg_declaring, png_declaring, random_image, webp_declaring
from PIL import Image

from service.app import create_app
from service.decoding.budget import DecodeBusy, MemoryBudget
from service.decoding.pool import DecodeLimits, Decoder
from service.decoding.probe import ImageRejected, probe_image
from service.settings import Settings

MiB = 2**20
HEADER_TIMEOUT_S = 1.0
IDLE_TIMEOUT_S = 1.5
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 40
IMAGE_DECODE_MB = 16  # 2000x2000 RGBA (15.3 MiB) fits; 5000x5000 of anything does not
REQUEST_DECODE_MB = 40
DECODE_BUDGET_MB = 64  # one 2000x2000 RGBA WebP decode (61.3 MiB at its peak) at a time
SETTINGS = {
    "precision": "fp32",
    "header_timeout_s": str(HEADER_TIMEOUT_S),
    "idle_timeout_s": str(IDLE_TIMEOUT_S),
    "max_header_bytes": str(MAX_HEADER_BYTES),
    "max_headers": str(MAX_HEADERS),
    "max_image_decode_mb": str(IMAGE_DECODE_MB),
    "max_request_decode_mb": str(REQUEST_DECODE_MB),
    "decode_budget_mb": str(DECODE_BUDGET_MB),
    "decode_wait_s": "0.2",
    "decode_threads": "4",
    "log_requests": "true",
}
LONG_S = 60.0  # a socket read that should end much sooner; only there so that a failure cannot hang


def serve(bundle_dir: Path, log: Path, **settings: str):
    return camserve(bundle_dir, log, **{**SETTINGS, **settings})


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(bundle_dir, tmp_path_factory.mktemp("bounds") / "server.log") as running:
        yield running


# -- images ---------------------------------------------------------------------------------------------
def gradient(width: int, height: int, mode: str = "RGBA") -> Image.Image:
    """Smooth: compresses to almost nothing, decodes to width x height x bands, as a bomb does."""
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    g = ((x + y) / 2).astype(np.uint8)
    bands = {"RGBA": [g, g, 255 - g, g], "RGB": [g, g, 255 - g], "L": [g]}[mode]
    return Image.fromarray(np.dstack(bands) if len(bands) > 1 else g, mode)


def small_png(seed: int = 0) -> bytes:
    return encode(random_image(seed))


# -- an honest client, served while the attacks run -----------------------------------------------------
@dataclass
class Honest:
    """Asks for /livez and a small /predict back to back from a thread; records every answer."""

    base: str
    answers: list[tuple[float, float, str, int]] = field(default_factory=list)  # started, ended, path, status
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(base_url=self.base, timeout=30) as client:
            while not self.stop.is_set():
                for path in ("/livez", "/predict"):
                    started = time.monotonic()
                    try:
                        if path == "/predict":
                            response = client.post(path, files=[("files", ("honest.png", small_png(), "image/png"))])
                        else:
                            response = client.get(path)
                        status = response.status_code
                    except httpx.HTTPError:
                        status = 0
                    self.answers.append((started, time.monotonic(), path, status))


@contextmanager
def honest_client(server: Server) -> Iterator[Honest]:
    """Yields once the honest client has been answered; afterwards asserts that it was answered during
    the block (a request of its started and ended inside it) and never refused."""
    honest = Honest(server.base_url)
    thread = threading.Thread(target=honest.run, daemon=True)
    thread.start()
    wait_until(lambda: len(honest.answers) >= 2, LONG_S, interval_s=0.01)
    started = time.monotonic()
    try:
        yield honest
        ended = time.monotonic()
        wait_until(lambda: any(a[0] > ended for a in honest.answers), LONG_S, interval_s=0.01)
    finally:
        honest.stop.set()
        thread.join(timeout=LONG_S)
    failed = [a for a in honest.answers if a[3] != 200]
    assert not failed, f"the honest client was refused: {failed[:5]}"
    assert any(a[0] >= started and a[1] <= ended for a in honest.answers) or any(
        a[0] < ended and a[1] > started for a in honest.answers
    ), "no honest request was answered during the attack"


def predict(server: Server, files: list[tuple[str, bytes]], timeout: float = LONG_S) -> httpx.Response:
    parts = [("files", (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(f"{server.base_url}/predict", files=parts, timeout=timeout)


# -- decode bombs: priced from the header, refused before any pixel is decoded --------------------------
# Headers alone (helpers.*_declaring): what is priced is what the header declares, so the bytes behind it
# do not matter, and a test need not spend seconds encoding 5000x5000 images to build one.
BOMBS = {
    "lossless.webp": lambda: webp_declaring(5000, 5000),  # 36 bytes, 95 MiB decoded
    "deep.png": lambda: png_declaring(5000, 5000),  # RGBA
    "pixels.png": lambda: png_declaring(20000, 20000, colour_type=0, bit_depth=1),  # 400 M pixels of 1 bit
    "canvas.gif": lambda: gif_declaring(5000, 5000),
    "huge-canvas.gif": lambda: gif_declaring(65535, 65535),  # 4.3 G pixels in 35 bytes
    "huge.jpg": lambda: jpeg_declaring(60000, 60000),  # 3.6 G pixels declared in a 2 KB file
    "progressive.jpg": lambda: jpeg_declaring(5000, 5000, progressive=True),  # every coefficient kept: 143 MiB
}


@pytest.mark.server
@pytest.mark.parametrize("name", list(BOMBS))
def test_decode_bombs_are_refused_with_413_naming_the_file(server: Server, name: str) -> None:
    data = BOMBS[name]()
    assert len(data) < 8 * 1024
    with honest_client(server):
        response = predict(server, [("fine.png", small_png()), (name, data)])
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert detail.startswith(f"{name}: "), detail
    assert any(word in detail for word in ("exceeds the limit", "decode memory budget", "too many pixels")), detail


def test_bombs_are_priced_without_decoding() -> None:
    """The per-image limit holds before ``load``: nothing of the 95 MiB is ever allocated."""
    data = BOMBS["lossless.webp"]()
    with pytest.raises(ImageRejected) as refused:
        probe_image(data, "b.webp", max_pixels=25_000_000, max_decoded_bytes=IMAGE_DECODE_MB * MiB)
    assert refused.value.status_code == 413 and "5000x5000 RGBA (95.4 MiB)" in str(refused.value)
    probe = probe_image(data, "b.webp", max_pixels=25_000_000)
    assert probe.decoded_bytes == 5000 * 5000 * 4 and probe.image._im is None  # header read, no pixels
    probe.close()


@pytest.mark.server
def test_a_phone_photo_is_served_from_its_reduced_scale(server: Server) -> None:
    """4000x3000 JPEG: libjpeg decodes it at 1/8 scale (500x375), well inside every limit."""
    photo = encode(gradient(4000, 3000, "RGB"), "JPEG", quality=90)
    probe = probe_image(photo, "photo.jpg", max_pixels=25_000_000)
    assert probe.image.size == (500, 375) and probe.decoded_bytes == 500 * 375 * 3
    probe.close()
    response = predict(server, [("photo.jpg", photo)])
    assert response.status_code == 200, response.text


@pytest.mark.server
def test_the_request_total_is_capped_before_decoding(server: Server) -> None:
    image = webp_declaring(1800, 1800)  # 12.4 MiB decoded, under the 16 per image
    files = [(f"{i}.webp", image) for i in range(4)]  # 49 MiB in all, over the 40 per request
    with honest_client(server):
        response = predict(server, files)
    assert response.status_code == 413, response.text
    assert response.json()["detail"].startswith("3.webp: the request's images decode to more than 40.0 MiB")


@pytest.mark.server
def test_livez_answers_while_heavy_images_are_decoded(server: Server) -> None:
    """Allowed but costly decodes (a second or more in all) run on decode threads: the event loop,
    and with it /livez, keeps answering while they run."""
    image = encode(gradient(1900, 1900), "WEBP", lossless=True)
    done = threading.Event()
    answered_meanwhile: list[int] = []

    def heavy() -> httpx.Response:
        try:
            return predict(server, [(f"{i}.webp", image) for i in range(2)])
        finally:
            done.set()

    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.base_url, timeout=LONG_S) as client:
        future = pool.submit(heavy)
        while not done.is_set():
            status = client.get("/livez").status_code
            if not done.is_set():
                answered_meanwhile.append(status)
        assert future.result().status_code == 200
    assert answered_meanwhile and set(answered_meanwhile) == {200}


@pytest.mark.server
def test_concurrent_decodes_wait_for_the_budget_then_get_503(server: Server) -> None:
    """Each of these needs 61.3 MiB of the 64 MiB budget: one decodes at a time, the others wait
    0.2 s for room and get 503 with Retry-After; small images still fit beside them."""
    image = encode(gradient(2000, 2000), "WEBP", lossless=True)
    busy_before = metric(scrape(server.base_url), "camserve_rejections_total", reason="decode_busy")
    with honest_client(server), ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: predict(server, [(f"{i}.webp", image)]), range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    busy = [r for r in responses if r.status_code == 503]
    assert all(r.headers.get("retry-after") and "decode memory budget busy" in r.json()["detail"] for r in busy)
    assert metric(scrape(server.base_url), "camserve_rejections_total", reason="decode_busy") - busy_before == len(busy)


def test_grouped_decoding_gives_each_request_its_own_images_and_errors() -> None:
    """Decode threads take requests in groups (service.decoding.handoff.Handoff): under a burst of requests
    at once, each still gets its own images in its own order, a corrupt file fails its request alone,
    and a request cancelled while it waits leaves the others and the budget untouched."""
    decoder = Decoder(
        DecodeLimits(max_pixels=10**6, max_frames=10, max_image_bytes=16 * MiB, max_request_bytes=64 * MiB, wait_s=5),
        threads=2,
        budget_bytes=256 * MiB,
    )

    def solid(request: int, index: int) -> tuple[str, bytes]:
        colour = (request * 5 % 256, index * 60, 255 - request * 5 % 256)
        return f"{request}-{index}.png", encode(Image.new("RGB", (32, 32), colour), "PNG")

    requests = [[solid(r, i) for i in range(1 + r % 3)] for r in range(48)]
    corrupt = {7, 30}
    for r in corrupt:
        requests[r][-1] = (requests[r][-1][0], b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)

    async def burst() -> tuple[list, bool]:
        tasks = [asyncio.ensure_future(decoder.decode(files)) for files in requests]
        cancelled = asyncio.ensure_future(decoder.decode([solid(99, 0)]))
        cancelled.cancel()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.2)  # let the threads finish whatever they took
        return outcomes, cancelled.cancelled()

    try:
        outcomes, was_cancelled = asyncio.run(burst())
    finally:
        decoder.shutdown()
    assert was_cancelled
    for r, (files, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        if r in corrupt:
            assert isinstance(outcome, ImageRejected) and outcome.filename == files[-1][0], outcome
            continue
        assert [tuple(image[:, 0, 0].tolist()) for image in outcome] == [
            (r * 5 % 256, i * 60, 255 - r * 5 % 256) for i in range(len(files))
        ]
    assert decoder.budget.in_use == 0


def test_the_budget_is_never_exceeded_by_concurrent_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: every decode is watched, and the reserved total never passes the budget."""
    import service.decoding.pool as decoding

    image = encode(gradient(600, 600), "WEBP", lossless=True)
    peak = probe_image(image, "one.webp", max_pixels=10**8).peak_bytes  # 5.8 MiB
    budget = int(2.5 * peak)
    decoder = Decoder(
        DecodeLimits(max_pixels=10**8, max_frames=10, max_image_bytes=64 * MiB, max_request_bytes=64 * MiB, wait_s=30),
        threads=8,
        budget_bytes=budget,
    )
    seen: list[int] = []
    running = 0
    most_running = 0
    lock = threading.Lock()
    real = decoding.decode_probed

    def watched(probe, size=32):
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
            seen.append(decoder.budget.in_use)
        try:
            time.sleep(0.02)  # hold the reservation a little, so that decodes overlap
            return real(probe, size)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(decoding, "decode_probed", watched)

    async def many() -> list[int]:
        batches = await asyncio.gather(
            *(decoder.decode([(f"{i}-{j}.webp", image) for j in range(3)]) for i in range(8))
        )
        return [len(images) for images in batches]

    try:
        assert asyncio.run(many()) == [3] * 8
    finally:
        decoder.shutdown()
    assert len(seen) == 24 and max(seen) <= budget
    assert most_running == 2  # room for two at once, never three
    assert decoder.budget.in_use == 0


def test_memory_budget_waits_then_refuses() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(100)
        assert budget.try_take(80)
        waiter = asyncio.create_task(budget.take(50, timeout_s=30))
        await asyncio.sleep(0)
        assert not waiter.done()
        await asyncio.to_thread(budget.release, 80)  # released from another thread, as decode threads do
        await asyncio.wait_for(waiter, 5)
        assert budget.in_use == 50
        with pytest.raises(DecodeBusy):
            await budget.take(60, timeout_s=0.05)
        assert budget.in_use == 50

    asyncio.run(scenario())


# -- headers: size and count ------------------------------------------------------------------------------
def raw_exchange(server: Server, payload: bytes, *, shut_write: bool = False) -> bytes:
    """Send ``payload`` on a fresh connection, read until the server closes it."""
    with socket.create_connection(server.address, timeout=LONG_S) as sock:
        try:
            sock.sendall(payload)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.mark.server
def test_oversized_headers_get_431(server: Server) -> None:
    with honest_client(server):
        one_big = httpx.get(f"{server.base_url}/livez", headers={"X-Filler": "a" * (MAX_HEADER_BYTES + 1)})
        many = httpx.get(f"{server.base_url}/livez", headers={f"X-H{i}": "1" for i in range(MAX_HEADERS + 1)})
        long_url = httpx.get(f"{server.base_url}/livez?q={'a' * MAX_HEADER_BYTES}")
    for response in (one_big, many, long_url):
        assert response.status_code == 431 and response.headers["connection"] == "close", response.text
    assert "request headers" in many.json()["detail"]
    # Just under the limits is fine.
    fits = {f"X-H{i}": "1" for i in range(MAX_HEADERS - 10)} | {"X-Filler": "a" * (MAX_HEADER_BYTES // 2)}
    assert httpx.get(f"{server.base_url}/livez", headers=fits).status_code == 200


@pytest.mark.server
def test_an_endless_header_is_cut_off_not_buffered(server: Server) -> None:
    """A header streamed without end: answered 431 once the limit is passed, long before 20 MB."""
    with honest_client(server), socket.create_connection(server.address, timeout=LONG_S) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        sent = 0
        try:
            while sent < 20 * MiB:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer, _ = closed_after(sock)
    assert sent < 20 * MiB, "the server read 20 MB of one header"
    # The 431 arrives unless the server's reset (it closed with our bytes unread) overtook it.
    assert answer.startswith(b"HTTP/1.1 431") or answer == b"", answer[:200]


# -- silent, half-sent and slow connections ---------------------------------------------------------------
def closed_after(sock: socket.socket) -> tuple[bytes, float]:
    """Block until the server closes ``sock``; what it sent, and after how long."""
    started = time.monotonic()
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - started


@pytest.mark.server
def test_silent_connections_are_closed_after_the_idle_timeout(server: Server) -> None:
    with honest_client(server):
        sockets = [socket.create_connection(server.address, timeout=LONG_S) for _ in range(50)]
        try:
            results = [closed_after(sock) for sock in sockets]
        finally:
            for sock in sockets:
                sock.close()
    # Every read ended (none ran into LONG_S): the server closed them all, saying nothing, as no request began.
    assert all(data == b"" for data, _ in results)


@pytest.mark.server
def test_a_half_sent_request_gets_408_at_the_header_deadline(server: Server) -> None:
    with honest_client(server), socket.create_connection(server.address, timeout=LONG_S) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
        data, _ = closed_after(sock)
    assert data.startswith(b"HTTP/1.1 408"), data
    assert b"request headers not received within 1 s" in data


@pytest.mark.server
def test_a_slowloris_trickling_headers_gets_408(server: Server) -> None:
    """One header byte every 50 ms keeps every byte-driven timer alive; the header deadline is not one."""
    with honest_client(server), socket.create_connection(server.address, timeout=LONG_S) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n")
        answer = b""
        try:
            for _ in range(int(10 * HEADER_TIMEOUT_S / 0.05)):
                sock.sendall(b"X-Slow: 1\r\n"[:1])
                time.sleep(0.05)
                sock.setblocking(False)
                try:
                    answer += sock.recv(65536)
                except BlockingIOError:
                    pass
                finally:
                    sock.setblocking(True)
                if answer:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        if not answer:
            answer, _ = closed_after(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer


@pytest.mark.server
def test_a_keep_alive_connection_is_closed_when_idle(server: Server) -> None:
    with socket.create_connection(server.address, timeout=LONG_S) as sock:
        sock.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        data, _ = closed_after(sock)
    assert data.startswith(b"HTTP/1.1 200") and data.endswith(b'{"status":"alive"}')


@pytest.mark.server
def test_the_connection_cap_refuses_with_503_then_recovers(bundle_dir: Path, tmp_path: Path) -> None:
    """Past ``MAX_CONNECTIONS`` open connections every request gets a 503 in the error shape of its path; the
    silent ones that hold the places are closed at the idle deadline, and then honest clients are served again."""
    with serve(bundle_dir, tmp_path / "capped.log", max_connections="4") as capped:
        holders = [socket.create_connection(capped.address, timeout=LONG_S) for _ in range(4)]
        try:
            refused = raw_exchange(capped, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 503"), refused
            # The service's own error shape and Retry-After, not uvicorn's plain text (one error path).
            assert b"retry-after: 1\r\n" in refused.lower() and b'{"detail": "too many connections' in refused
            protocol = raw_exchange(capped, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert protocol.startswith(b"HTTP/1.1 503") and b'{"error": "too many connections' in protocol, protocol
            for sock in holders:
                assert closed_after(sock)[0] == b""
        finally:
            for sock in holders:
                sock.close()
        wait_until(lambda: httpx.get(f"{capped.base_url}/livez", timeout=10).status_code == 200)
        assert predict(capped, [("a.png", small_png())]).status_code == 200


# -- the small ones -----------------------------------------------------------------------------------------
@pytest.mark.server
def test_a_multipart_look_alike_content_type_is_415(server: Server) -> None:
    body = multipart_body([("a.png", small_png())], boundary="b", part_type=None).data
    for content_type in ("multipart/form-dataX; boundary=b", "multipart/form-data-x; boundary=b", "text/plain"):
        response = httpx.post(f"{server.base_url}/predict", content=body, headers={"Content-Type": content_type})
        assert response.status_code == 415, (content_type, response.text)
    # image/* is a raw image body (issue 16): a multipart body sent as one is not an image, a clear 400
    response = httpx.post(f"{server.base_url}/predict", content=body, headers={"Content-Type": "image/png"})
    assert response.status_code == 400 and "not an image" in response.json()["detail"], response.text
    ok = httpx.post(
        f"{server.base_url}/predict", content=body, headers={"Content-Type": "Multipart/Form-Data; boundary=b"}
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.server
@pytest.mark.parametrize("path", ["/livez", "/readyz", "/health", "/metrics", "/", "/docs", "/static/index.html"])
def test_head_is_answered_where_get_is(server: Server, path: str) -> None:
    get = httpx.get(f"{server.base_url}{path}")
    head = httpx.head(f"{server.base_url}{path}")
    assert get.status_code == head.status_code == 200
    assert head.content == b"" and head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.server
def test_redirects_are_relative_and_reflect_no_host(server: Server) -> None:
    evil = {"Host": "evil.example"}
    # /static is redirected (a trailing slash added), and the Location names no host, the Host header's least.
    response = httpx.get(f"{server.base_url}/static", headers=evil, follow_redirects=False)
    assert response.is_redirect and response.headers["location"] == "/static/", (response, response.headers)
    # A path that reads as another host is not found, or redirected on this site: never off it.
    response = httpx.get(f"{server.base_url}//evil.example/static", headers=evil, follow_redirects=False)
    assert response.status_code == 404 or (response.is_redirect and response.headers["location"] == "/static/"), (
        response,
        response.headers,
    )
    assert httpx.get(f"{server.base_url}/static/index.html").status_code == 200


@pytest.mark.server
def test_a_half_closed_client_gets_its_answer(server: Server) -> None:
    answer = raw_exchange(server, b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n", shut_write=True)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b'{"status":"alive"}')
    body = multipart_body([("h.png", small_png())], boundary="b", part_type=None).data
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    answer = raw_exchange(server, head.encode() + body, shut_write=True)
    assert answer.startswith(b"HTTP/1.1 200") and b'"filename":"h.png"' in answer


@pytest.mark.server
def test_a_client_that_half_closes_mid_body_is_logged_as_gone(server: Server) -> None:
    request_id = f"halfbody{time.monotonic_ns()}"
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: 100000\r\nX-Request-ID: {request_id}\r\n\r\n"
    )
    answer = raw_exchange(server, head.encode() + b"--b\r\n", shut_write=True)
    assert answer == b""

    def logged() -> list[dict]:
        lines = [line for line in server.log_path.read_text().splitlines() if request_id in line]
        return [json.loads(line) for line in lines if line.startswith("{")]

    wait_until(lambda: bool(logged()))
    assert logged()[0]["status"] == 499


# -- admission before work ----------------------------------------------------------------------------------
async def test_a_full_queue_or_a_draining_service_refuses_before_reading_the_body(bundle_dir: Path) -> None:
    """Both model lanes are held busy, the queue (2 images) filled; the next request is refused with
    503 without its body being read: its ``receive`` is never called."""
    settings = Settings(model_dir=bundle_dir, precision="fp32", queue_size=2, max_batch_size=1, log_requests=False)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        state = app.state.camserve
        release = threading.Event()
        executor = state.predict_batcher._executor
        blockers = [executor.submit(release.wait) for _ in range(state.lanes)]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=LONG_S) as client:
            batcher = state.predict_batcher
            queued = []
            for i in range(state.lanes + 2):  # one at a time: each lane takes one, then two wait in the queue
                files = [("files", (f"{i}.png", small_png(i), "image/png"))]
                queued.append(asyncio.create_task(client.post("/predict", files=files)))
                if i < state.lanes:
                    await wait_until_async(lambda i=i: batcher._running == i + 1, LONG_S)
                else:
                    await wait_until_async(lambda i=i: batcher.depth == i + 1 - state.lanes, LONG_S)
            await wait_until_async(lambda: state.predict_batcher.free <= 0, LONG_S)

            refused, body_read = await _call_without_body(app, "/predict")
            assert refused["status"] == 503 and not body_read
            assert (b"retry-after", b"1") in refused["headers"]

            release.set()
            assert [r.status_code for r in await asyncio.gather(*queued)] == [200] * len(queued)
        for blocker in blockers:
            blocker.result()
        state.draining = True
        refused, body_read = await _call_without_body(app, "/gradcam")
        assert refused["status"] == 503 and not body_read
        state.draining = False


async def _call_without_body(app, path: str) -> tuple[dict, bool]:
    """Call the app directly with a POST whose body would come from ``receive``; report whether it asked."""
    read = False

    async def receive() -> dict:
        nonlocal read
        read = True
        return {"type": "http.request", "body": b"", "more_body": False}

    started: dict = {}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            started.update(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"100")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return started, read

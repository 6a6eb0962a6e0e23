"""Hostile, greedy and unlucky clients against a real ``python -m service`` (issue 7's proof).

Every attack runs while an honest client keeps asking for predictions from a background thread, and
each test asserts both halves: the attack is refused quickly with a 4xx, and every honest answer,
including those that overlapped the attack, is a 200 with the right probabilities for its own image.
Raw sockets play the clients that misbehave below HTTP (trickling a body, hanging up half-way),
which no HTTP library does on request. Expected answers come from the bundle itself: one image at a
time, fp32, no HTTP and no batching, so a lost, duplicated or mixed-up row cannot go unnoticed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import select
import shutil
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import torch
from harness import Samples, Server, camserve, metric, multipart_body, rss_bytes, scrape, wait_until
from helpers import encode, served_probabilities
from PIL import Image

from camcore.bundle import MISCLASSIFIED_DIR, load_bundle, write_bundle
from camcore.preprocess import Normalize
from service.decoding.probe import decode_image

pytestmark = pytest.mark.server

BODY_TIMEOUT_S = 2.0
QUEUE_SIZE = 16  # images per endpoint: small, so a burst overflows it at once
MAX_BATCH = 8
MAX_UPLOAD = 16 * 1024 * 1024
MAX_FILES = 64
MAX_FRAMES = 100  # per animated image: small, so a modest GIF is over it
QUICK_S = 3.0  # "refused quickly": generous for a loaded CI box, tiny next to a 100 MB upload
ATOL = 1e-4  # probabilities: batched fp32 vs single-image fp32
POOL = 32  # distinct honest images
BOUNDARY = "camserve-hardening-boundary"

T = TypeVar("T")


# -- the server and what it should answer -------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bundle with its classifier weights x100.

    An untrained net's ``logit_scale`` makes every answer nearly uniform (images differ by ~1e-4),
    too close to tell a mixed-up row from rounding; sharpened, they differ by ~1e-2.
    """
    bundle = load_bundle(bundle_dir)
    with torch.no_grad():
        bundle.model.head[2].weight.mul_(100)
    path = tmp_path_factory.mktemp("sharpened") / "bundle"
    shutil.copytree(bundle_dir / MISCLASSIFIED_DIR, path / MISCLASSIFIED_DIR)
    derived = {"format", "architecture", "parameters", "weights_sha256"}  # write_bundle fills these in
    return write_bundle(path, bundle.model, {k: v for k, v in bundle.metadata.items() if k not in derived})


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    settings = {
        "precision": "fp32",
        "body_timeout_s": str(BODY_TIMEOUT_S),
        "queue_size": str(QUEUE_SIZE),
        "max_batch_size": str(MAX_BATCH),
        "max_upload_bytes": str(MAX_UPLOAD),
        "max_files": str(MAX_FILES),
        "max_image_frames": str(MAX_FRAMES),
        "log_requests": "true",
    }
    with camserve(model_dir, log, **settings) as running:
        yield running


@dataclass(frozen=True)
class Reference:
    """The honest images and, per image, the probabilities the bundle gives it alone."""

    payloads: list[bytes]
    probabilities: torch.Tensor  # (images, classes)

    def answers(self, indices: list[int], body: dict[str, Any]) -> bool:
        """Whether a /predict?top_k=10 body holds exactly these images' rows, in the order sent."""
        predictions = body["predictions"]
        if [p["filename"] for p in predictions] != [f"{i}.png" for i in indices]:
            return False
        for index, prediction in zip(indices, predictions, strict=True):
            served = torch.zeros(self.probabilities.shape[1])
            for entry in prediction["top_k"]:
                served[entry["index"]] = entry["probability"]
            if not torch.allclose(served, self.probabilities[index], atol=ATOL):
                return False
        return True


def single_image_probabilities(model_dir: Path, payloads: list[bytes]) -> torch.Tensor:
    """The bundle in fp32 on one image at a time, decoded exactly as the service decodes uploads."""
    bundle = load_bundle(model_dir)
    normalize = Normalize(bundle.metadata["mean"], bundle.metadata["std"])
    rows = []
    with torch.inference_mode():
        for i, data in enumerate(payloads):
            image = decode_image(data, f"{i}.png", max_pixels=1_000_000, max_frames=MAX_FRAMES)
            rows.append(served_probabilities(bundle.model, normalize(image[None]))[0])
    return torch.stack(rows)


def pool_image(index: int) -> Image.Image:
    """Noise around a random colour: images far apart, so even an untrained net tells them apart."""
    rng = np.random.default_rng(7000 + index)
    pixels = rng.integers(0, 256, 3) + rng.integers(-40, 40, (32, 32, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Reference:
    payloads = [encode(pool_image(i)) for i in range(POOL)]
    probabilities = single_image_probabilities(model_dir, payloads)
    # A mix-up is only visible if no two images share an answer: keep them well apart.
    gaps = (probabilities[:, None, :] - probabilities[None, :, :]).abs().amax(-1)
    assert gaps[~torch.eye(POOL, dtype=torch.bool)].min() > 10 * ATOL
    return Reference(payloads, probabilities)


# -- an honest client, and attacks run while it is served ---------------------------------------------
@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    status: int
    correct: bool


def ask(client: httpx.Client, reference: Reference, indices: list[int]) -> Call:
    """One honest /predict, checked against the reference."""
    files = [("files", (f"{i}.png", reference.payloads[i], "image/png")) for i in indices]
    started = time.monotonic()
    try:
        response = client.post("/predict?top_k=10", files=files)
    except httpx.HTTPError:
        return Call(started, time.monotonic(), 0, False)
    ok = response.status_code == 200 and reference.answers(indices, response.json())
    return Call(started, time.monotonic(), response.status_code, ok)


@contextmanager
def honest_client(base: str, reference: Reference) -> Iterator[list[Call]]:
    """Ask back to back, one image at a time, from a thread, until the block ends."""
    calls: list[Call] = []
    stop = threading.Event()

    def loop() -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            for n in itertools.count():
                if stop.is_set():
                    return
                calls.append(ask(client, reference, [n % POOL]))

    thread = threading.Thread(target=loop, name="honest-client", daemon=True)
    thread.start()
    try:
        yield calls
    finally:
        stop.set()
        thread.join(timeout=60)


def under_attack(server: Server, reference: Reference, attack: Callable[[], T]) -> tuple[T, float]:
    """Run ``attack`` while an honest client is served; return its result and its duration.

    Asserts the other half of every hardening claim: honest requests ran before, during and after
    the attack, and every one of them got a 200 with its own image's answer.
    """
    with honest_client(server.base_url, reference) as calls:
        wait_until(lambda: len(calls) >= 1, 30, interval_s=0.01)
        started = time.monotonic()
        result = attack()
        ended = time.monotonic()
        wait_until(lambda: any(call.started > ended for call in calls), 30, interval_s=0.01)
    wrong = [call for call in calls if call.status != 200 or not call.correct]
    assert not wrong, f"honest client failed during the attack: {wrong[:5]}"
    assert any(call.started < ended and call.ended > started for call in calls), "no honest request overlapped it"
    return result, ended - started


# -- raw HTTP: the clients no library will imitate -----------------------------------------------------
@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    sent: int  # body bytes the server had taken when its answer arrived

    def detail(self) -> str:
        return json.loads(self.body)["detail"]


def multipart(files: list[tuple[str, bytes]]) -> bytes:
    return multipart_body(files, boundary=BOUNDARY, part_type="application/octet-stream").data


def post_head(path: str, length: int | None) -> bytes:
    """Request line and headers; ``length`` None streams the body with chunked transfer encoding."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST {path} HTTP/1.1\r\nHost: camserve\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n"
    ).encode()


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in chunks:
        yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
    yield b"0\r\n\r\n"


def zeros(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """``total`` zero bytes, produced lazily: a 100 MB body never sits in the test's memory."""
    block = bytes(chunk)
    for start in range(0, total, chunk):
        yield block[: min(chunk, total - start)]


def raw_exchange(
    address: tuple[str, int], head: bytes, body: Iterable[bytes], *, pause_s: float = 0.0, timeout_s: float = 30.0
) -> RawResponse:
    """Send ``head`` then the body chunks (``pause_s`` apart), stopping as soon as an answer arrives.

    A server that refuses early answers while the client is still sending: reading only after
    sending everything would block on full socket buffers, or lose the answer to the reset.
    """
    deadline = time.monotonic() + timeout_s
    with socket.create_connection(address, timeout=timeout_s) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        sent = 0
        for chunk in body:
            view = memoryview(chunk)
            while view:
                readable, writable, _ = select.select([sock], [sock], [], max(0.0, deadline - time.monotonic()))
                if readable:
                    return _read_response(sock, sent, deadline)
                if not writable:
                    raise TimeoutError(f"server neither read nor answered after {sent} body bytes")
                try:
                    count = sock.send(view)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    return _read_response(sock, sent, deadline)
                view, sent = view[count:], sent + count
            if pause_s and select.select([sock], [], [], pause_s)[0]:
                return _read_response(sock, sent, deadline)
        return _read_response(sock, sent, deadline)


def _read_response(sock: socket.socket, sent: int, deadline: float) -> RawResponse:
    sock.setblocking(True)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed without an answer after {sent} body bytes")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(":", 1) for line in lines)}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body[:length], sent)


def hang_up_after(address: tuple[str, int], head: bytes, body: bytes) -> None:
    """Send a request (or part of one) and close the connection without waiting for the answer."""
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(head + body)


# -- metrics ----------------------------------------------------------------------------------------------
def server_errors(samples: Samples) -> float:
    return sum(
        value
        for (name, labels), value in samples.items()
        if name == "camserve_requests_total" and dict(labels)["status"].startswith("5")
    )


# -- hostile uploads ----------------------------------------------------------------------------------
def post_files(server: Server, files: list[tuple[str, bytes]]) -> RawResponse:
    body = multipart(files)
    return raw_exchange(server.address, post_head("/predict", len(body)), [body])


def gif_of_tiny_frames(total: int) -> bytes:
    """A valid GIF of about ``total`` bytes, all one-pixel frames of 15 bytes each."""
    screen = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame * ((total - len(screen) - 1) // len(frame)) + b";"


def test_gif_over_the_frame_cap_is_refused_quickly(server: Server, reference: Reference) -> None:
    """A whole upload's worth of one-pixel frames (1.1 million) is refused once the count passes the cap.

    The count stops at the cap, so refusing costs what a small GIF costs; Pillow's own ``n_frames``
    would first walk all 1.1 million frames in Python, seconds of holding the GIL.
    """
    gif = gif_of_tiny_frames(MAX_UPLOAD - 4096)
    assert len(gif) // 15 > 1_000_000
    response, seconds = under_attack(server, reference, lambda: post_files(server, [("reel.gif", gif)]))
    assert response.status == 413
    assert response.detail() == f"reel.gif: too many frames: at most {MAX_FRAMES} per image"
    assert seconds < QUICK_S
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_a_declared_100_mb_body_is_refused_before_it_is_read(server: Server, reference: Reference) -> None:
    size = 100 * 1024 * 1024
    response, seconds = under_attack(
        server, reference, lambda: raw_exchange(server.address, post_head("/predict", size), zeros(size))
    )
    assert response.status == 413 and "exceeds the limit" in response.detail()
    assert response.headers["connection"] == "close"
    assert response.sent < MAX_UPLOAD  # answered from the headers, long before the limit's worth arrived
    assert seconds < QUICK_S


def test_a_streamed_100_mb_body_is_cut_off_at_the_limit(server: Server, reference: Reference) -> None:
    opening = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'.encode()
    body = chunked(itertools.chain([opening], zeros(100 * 1024 * 1024)))
    response, seconds = under_attack(
        server, reference, lambda: raw_exchange(server.address, post_head("/predict", None), body)
    )
    assert response.status == 413 and "exceeds" in response.detail()
    assert response.sent < MAX_UPLOAD + 16 * 1024 * 1024  # the limit, plus what socket buffers held
    assert seconds < QUICK_S


def test_slow_clients_get_408_at_the_body_deadline(server: Server, reference: Reference) -> None:
    """Clients that send headers and then trickle the body are cut off, and tie up nothing meanwhile."""
    body = multipart([("slow.png", reference.payloads[0])])
    trickle = [body[i : i + 16] for i in range(0, len(body), 16)]  # 16 bytes every 0.25 s: minutes

    def slow_client() -> tuple[RawResponse, float]:
        started = time.monotonic()
        response = raw_exchange(server.address, post_head("/predict", len(body)), trickle, pause_s=0.25)
        return response, time.monotonic() - started

    def four_slow_clients() -> list[tuple[RawResponse, float]]:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: slow_client(), range(4)))

    results, _ = under_attack(server, reference, four_slow_clients)
    for response, seconds in results:
        assert response.status == 408 and "not received within" in response.detail()
        assert response.sent < len(body)
        assert BODY_TIMEOUT_S - 0.1 <= seconds < BODY_TIMEOUT_S + QUICK_S


# -- faults -------------------------------------------------------------------------------------------
def test_clients_that_hang_up_do_not_break_the_batch(server: Server, reference: Reference) -> None:
    """Half a body then a hang-up, or a whole request and a hang-up before the answer: the batches
    those images would have joined still answer everyone else, and the service reports healthy.

    Requests stay small (2 images) so that, all queued at once, they fit the small queue: a 503
    here would be load shedding, not the fault under test.
    """
    before = scrape(server.base_url)
    body = multipart([(f"{i}.png", reference.payloads[i]) for i in (0, 1)])
    head = post_head("/predict?top_k=10", len(body))

    def hang_ups_among_honest_requests() -> list[Call]:
        with ThreadPoolExecutor(12) as pool, httpx.Client(base_url=server.base_url, timeout=30) as client:
            half = [pool.submit(hang_up_after, server.address, head, body[: len(body) // 2]) for _ in range(4)]
            whole = [pool.submit(hang_up_after, server.address, head, body) for _ in range(4)]
            honest = [pool.submit(ask, client, reference, [7 - k, 3 + k][: 1 + k % 2]) for k in range(4)]
            for future in half + whole:
                future.result()
            return [future.result() for future in honest]

    honest, _ = under_attack(server, reference, hang_ups_among_honest_requests)
    assert all(call.status == 200 and call.correct for call in honest), honest
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        assert ask(client, reference, list(range(MAX_BATCH))).correct
    wait_until(lambda: metric(scrape(server.base_url), "camserve_queue_depth", endpoint="/predict") == 0)
    after = scrape(server.base_url)
    assert server_errors(after) == server_errors(before), "a client's hang-up was counted as a server error"
    assert metric(after, "camserve_rejections_total", reason="batch_failed") == 0
    hung_up = metric(after, "camserve_rejections_total", reason="client_disconnected") - metric(
        before, "camserve_rejections_total", reason="client_disconnected"
    )
    assert hung_up >= 4  # every half-sent body; whole requests count only if the hang-up beat the read
    log = server.log_path.read_text()
    assert "unhandled error" not in log and "Exception in ASGI application" not in log


# -- overload -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shot:
    indices: list[int]
    status: int
    retry_after: str | None
    body: dict[str, Any]
    seconds: float


def capacity_images_per_s(server: Server, reference: Reference) -> float:
    """What the server sustains: full batches, one after another (best of three)."""
    indices = list(range(MAX_BATCH))
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        calls = [ask(client, reference, indices) for _ in range(3)]
    assert all(call.correct for call in calls)
    return MAX_BATCH / min(call.ended - call.started for call in calls)


async def burst(base: str, reference: Reference, *, rate: float, per_request: int, count: int, seconds: float):
    """Open loop: launch requests at ``rate`` images/s whatever the answers, bounded in count and time."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

        async def shot(n: int) -> Shot:
            indices = [int(i) for i in np.random.default_rng(n).choice(POOL, per_request, replace=False)]
            files = [("files", (f"{i}.png", reference.payloads[i], "image/png")) for i in indices]
            started = time.monotonic()
            response = await client.post("/predict?top_k=10", files=files)
            elapsed = time.monotonic() - started
            return Shot(indices, response.status_code, response.headers.get("retry-after"), response.json(), elapsed)

        tasks = []
        started = time.monotonic()
        for n in range(count):
            delay = started + n * per_request / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.monotonic() - started > seconds:
                break
            tasks.append(asyncio.create_task(shot(n)))
        offered_s = max(time.monotonic() - started, 1e-3)
        return await asyncio.gather(*tasks), len(tasks) * per_request / offered_s


def test_overload_sheds_with_503_recovers_and_never_mixes_answers(server: Server, reference: Reference) -> None:
    capacity = capacity_images_per_s(server, reference)
    before, rss_before = scrape(server.base_url), rss_bytes(server.pid)
    load = burst(server.base_url, reference, rate=5 * capacity, per_request=4, count=160, seconds=3)
    shots, offered = asyncio.run(load)
    after, rss_after = scrape(server.base_url), rss_bytes(server.pid)
    ok = [s for s in shots if s.status == 200]
    shed = [s for s in shots if s.status == 503]
    print(
        f"\noverload: capacity {capacity:.0f} img/s, offered {offered:.0f} img/s, {len(shots)} requests: "
        f"{len(ok)} answered, {len(shed)} shed; slowest 200 {max((s.seconds for s in ok), default=0):.2f} s; "
        f"RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB"
    )
    assert offered > 2 * capacity, "the client could not offer an overload"
    assert {s.status for s in shots} <= {200, 503}, sorted({s.status for s in shots})
    assert ok and shed
    assert all(s.retry_after == "1" and "queue is full" in s.body["detail"] for s in shed)
    wrong = [s.indices for s in ok if not reference.answers(s.indices, s.body)]
    assert not wrong, f"answers mixed up or lost for {wrong[:5]}"
    # Bounded queue, bounded cost: accepted work waits at most a few batches, memory stays put.
    assert max(s.seconds for s in ok) < 10
    assert rss_after - rss_before < 256 * 2**20
    # Nothing lost, nothing run twice: the model saw exactly the accepted images.
    ran = metric(after, "camserve_images_total", endpoint="/predict") - metric(
        before, "camserve_images_total", endpoint="/predict"
    )
    assert ran == 4 * len(ok)
    refused = metric(after, "camserve_rejections_total", reason="queue_full") - metric(
        before, "camserve_rejections_total", reason="queue_full"
    )
    assert refused == len(shed)
    # Recovery: as soon as the burst is over, the service is ready and right again.
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        assert client.get("/readyz").status_code == 200
        assert ask(client, reference, list(range(MAX_BATCH))).correct
    assert metric(scrape(server.base_url), "camserve_queue_depth", endpoint="/predict") == 0


# -- structured request logs ----------------------------------------------------------------------------
def access_records(log: Path) -> list[dict[str, Any]]:
    """Every request line: each is a whole JSON object on its own line, nothing in front."""
    records = []
    for line in log.read_text().splitlines():
        if line.startswith('{"event": "request"'):
            records.append(json.loads(line))
    return records


def test_one_json_log_line_per_request(server: Server, reference: Reference) -> None:
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        files = [("files", (f"{i}.png", reference.payloads[i])) for i in range(3)]
        client.post("/predict", files=files, headers={"X-Request-ID": f"{tag}-predict"})
        client.post("/predict", files=[("files", ("x.txt", b"nope"))], headers={"X-Request-ID": f"{tag}-bad"})
        client.get("/livez", headers={"X-Request-ID": f"{tag}-live"})
        generated = client.get("/readyz").headers["x-request-id"]

    def mine() -> list[dict[str, Any]]:
        return [
            r
            for r in access_records(server.log_path)
            if r["request_id"].startswith(tag) or r["request_id"] == generated
        ]

    # Wait for all four lines, /readyz's too: each is written once its response has gone, which can be
    # after the client has read it.
    wait_until(lambda: len(mine()) >= 4, 30, what="a log line for each of the 4 requests")
    records = {r["request_id"]: r for r in access_records(server.log_path)}
    assert len(mine()) == 4, "exactly one line per request"
    for record in mine():
        assert {"method", "path", "status", "duration_ms", "request_id"} <= set(record)
        assert isinstance(record["duration_ms"], float | int) and record["duration_ms"] >= 0
    expected = {"request_id": f"{tag}-predict", "method": "POST", "path": "/predict", "status": 200, "images": 3}
    assert expected.items() <= records[f"{tag}-predict"].items()
    assert records[f"{tag}-bad"]["status"] == 400
    assert (records[f"{tag}-live"]["method"], records[f"{tag}-live"]["path"]) == ("GET", "/livez")
    assert records[generated]["path"] == "/readyz" and len(generated) == 32

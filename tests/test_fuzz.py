"""Property-based fuzzing of the decoding path (issue 7).

The promise in :mod:`service.decoding.probe`: whatever bytes a client sends end either as a (3, 32, 32)
uint8 tensor or as an :class:`ImageRejected` carrying a 4xx and naming the file, so a hostile
upload can never become a 500. Hypothesis tests it on random bytes, on real JPEG, PNG, GIF, WebP
and BMP files cut short or with bytes overwritten, inserted or deleted (biased towards the headers,
where parsers read sizes and counts), and on format magic followed by noise; then the same inputs
go through ``POST /predict`` in process, where the only acceptable answers are 200 or a JSON 4xx.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal
from helpers import encode, random_image
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.app import create_app
from service.decoding.probe import ImageRejected, decode_image
from service.settings import Settings

# Mutated EXIF blocks make Pillow warn while it reads them; expected here, and not a failure.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")

MAX_PIXELS = 1_000_000
REJECTIONS = {400, 413, 415}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ_HTTP = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _animated_gif() -> bytes:
    frames = [random_image(30 + i, size=(24, 24)).convert("P") for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def _seeds() -> dict[str, bytes]:
    """Small but real files in every supported format and its common variants: fuzzing starts here."""
    photo = random_image(11, size=(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "photo.jpg": encode(photo, "JPEG", quality=85),
        "progressive.jpg": encode(photo, "JPEG", quality=70, progressive=True),
        "exif.jpg": encode(photo, "JPEG", exif=exif),
        "gray.jpg": encode(photo.convert("L"), "JPEG"),
        "photo.png": encode(photo),
        "rgba.png": encode(random_image(12, size=(20, 20), mode="RGBA")),
        "palette.png": encode(photo.convert("P")),
        "interlaced.png": encode(photo, "PNG", interlace=1),
        "still.gif": encode(photo.convert("P"), "GIF"),
        "animated.gif": _animated_gif(),
        "lossy.webp": encode(photo, "WEBP", quality=60),
        "lossless.webp": encode(photo, "WEBP", lossless=True),
        "photo.bmp": encode(photo, "BMP"),
    }


SEEDS = _seeds()
MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ", b"BM"]


# -- strategies -------------------------------------------------------------------------------------------
seed_names = st.sampled_from(sorted(SEEDS))


@st.composite
def truncated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(seed_names)
    data = SEEDS[name]
    return name, data[: draw(st.integers(0, len(data) - 1))]


def _position(draw: st.DrawFn, size: int) -> int:
    """Anywhere in the file, but half the time within its first 64 bytes, where the header is."""
    return draw(st.one_of(st.integers(0, min(63, size - 1)), st.integers(0, size - 1)))


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(seed_names)
    data = bytearray(SEEDS[name])
    for _ in range(draw(st.integers(1, 8))):
        if not data:
            break
        position = _position(draw, len(data))
        edit = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        if edit == "overwrite":
            data[position] = draw(st.integers(0, 255))
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[position : position + draw(st.integers(1, 16))]
    return name, bytes(data)


@st.composite
def magic_then_noise(draw: st.DrawFn) -> tuple[str, bytes]:
    return "noise.bin", draw(st.sampled_from(MAGIC)) + draw(st.binary(max_size=512))


random_bytes = st.binary(max_size=2048).map(lambda data: ("random.bin", data))
uploads = st.one_of(random_bytes, truncated(), mutated(), magic_then_noise())


# -- decode_image directly ---------------------------------------------------------------------------------
def assert_decodes_or_rejects(name: str, data: bytes) -> None:
    """The decoder's contract: a (3, 32, 32) uint8 tensor, or ImageRejected with a 4xx naming the file."""
    try:
        tensor = decode_image(data, name, max_pixels=MAX_PIXELS)
    except ImageRejected as exc:
        assert exc.status_code in REJECTIONS
        assert str(exc).startswith(f"{name}: ")
        return
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(SEEDS))
def test_every_seed_is_a_real_image(name: str) -> None:
    """Mutations of files the decoder accepts reach deep into each parser; broken seeds would not."""
    assert Image.open(io.BytesIO(SEEDS[name])).format in {"JPEG", "PNG", "GIF", "WEBP", "BMP"}
    assert decode_image(SEEDS[name], name, max_pixels=MAX_PIXELS).shape == (3, 32, 32)


@FUZZ
@given(upload=random_bytes)
def test_random_bytes_decode_or_are_rejected(upload: tuple[str, bytes]) -> None:
    assert_decodes_or_rejects(*upload)


@FUZZ
@given(upload=truncated())
def test_truncated_images_decode_or_are_rejected(upload: tuple[str, bytes]) -> None:
    assert_decodes_or_rejects(*upload)


@FUZZ
@given(upload=mutated())
def test_mutated_images_decode_or_are_rejected(upload: tuple[str, bytes]) -> None:
    assert_decodes_or_rejects(*upload)


@FUZZ
@given(upload=magic_then_noise())
def test_format_magic_then_noise_decodes_or_is_rejected(upload: tuple[str, bytes]) -> None:
    assert_decodes_or_rejects(*upload)


# -- through the app ---------------------------------------------------------------------------------------
class PortalClient:
    """An in-process httpx client for synchronous Hypothesis tests.

    The app's lifespan (model, batcher queues) and every request run on one event loop in an anyio
    portal thread, as under uvicorn; Starlette's TestClient would do the same, but is deprecated
    with httpx.
    """

    def __init__(self, portal: BlockingPortal, client: httpx.AsyncClient) -> None:
        self.portal = portal
        self.client = client

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self.client.post, url, **kwargs))


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[PortalClient]:
    settings = Settings(
        model_dir=bundle_dir, precision="fp32", max_image_pixels=MAX_PIXELS, max_files=4, log_requests=False
    )
    app = create_app(settings)
    # raise_app_exceptions=False: a bug must surface as the 500 a client would see, not as a traceback.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        portal.wrap_async_context_manager(httpx.AsyncClient(transport=transport, base_url="http://camserve")) as http,
    ):
        yield PortalClient(portal, http)


def assert_answered_or_refused(response: httpx.Response, filename: str | None) -> None:
    assert response.status_code < 500, response.text
    body = response.json()
    if response.status_code == 200:
        [prediction] = body["predictions"]
        assert len(prediction["top_k"]) == 3
        if filename:
            assert prediction["filename"] == filename
    else:
        assert response.status_code in REJECTIONS | {422}, response.text
        assert isinstance(body["detail"], str) and body["detail"]


@FUZZ_HTTP
@given(upload=uploads)
def test_predict_never_answers_5xx(client: PortalClient, upload: tuple[str, bytes]) -> None:
    name, data = upload
    response = client.post("/predict", files=[("files", (name, data, "application/octet-stream"))])
    assert_answered_or_refused(response, name)
    if response.status_code != 200:
        assert response.status_code in REJECTIONS and response.json()["detail"].startswith(f"{name}: ")


@settings(max_examples=40, deadline=None)
@given(name=st.text(max_size=40), upload=st.one_of(st.sampled_from(sorted(SEEDS.values())), st.binary(max_size=64)))
def test_predict_survives_any_filename(client: PortalClient, name: str, upload: bytes) -> None:
    response = client.post("/predict", files=[("files", (name, upload, "application/octet-stream"))])
    assert_answered_or_refused(response, None)


@settings(max_examples=60, deadline=None)
@example(target="²")  # str.isdigit() says yes, int() says no
@example(target="--3")
@example(target="-0")
@given(target=st.text(max_size=8))
def test_gradcam_target_is_a_class_an_index_or_a_422(client: PortalClient, target: str) -> None:
    files = [("files", ("a.png", SEEDS["photo.png"], "image/png"))]
    response = client.post("/gradcam", params={"target": target}, files=files)
    assert response.status_code in (200, 422), response.text

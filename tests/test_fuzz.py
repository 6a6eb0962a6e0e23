"""Property-based fuzzing of the decoding path (issue 7).

The promise in :mod:`service.decoding.probe`: whatever bytes a client sends end either as a (3, 32, 32)
uint8 tensor or as an :class:`ImageRejected` carrying a 4xx and naming the file, so a hostile
upload can never become a 500. Hypothesis tests it on random bytes, on real JPEG, PNG, GIF, WebP
and BMP files cut short or with bytes overwritten, inserted or deleted (biased towards the headers,
where parsers read sizes and counts), and on format magic followed by noise; then the same inputs
go through ``POST /predict`` in process, where the only acceptable answers are 200 or a JSON 4xx.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from anyio.from_thread import BlockingPortal, start_blocking_portal
from fastapi import HTTPException
from helpers import encode, random_image
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.app import create_app
from service.decoding.probe import ImageRejected, decode_image
from service.oip.tensors import json_value_limit, read_input
from service.oip.wire import WireError, parse_request, split_body, split_bytes_elements
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

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.portal.call(functools.partial(self.client.get, url, **kwargs))


@contextlib.contextmanager
def portal_client(settings: Settings) -> Iterator[PortalClient]:
    app = create_app(settings)
    # raise_app_exceptions=False: a bug must surface as the 500 a client would see, not as a traceback.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    with (
        start_blocking_portal() as portal,
        portal.wrap_async_context_manager(app.router.lifespan_context(app)),
        portal.wrap_async_context_manager(httpx.AsyncClient(transport=transport, base_url="http://camserve")) as http,
    ):
        yield PortalClient(portal, http)


@pytest.fixture(scope="module")
def client(bundle_dir: Path) -> Iterator[PortalClient]:
    settings = Settings(
        model_dir=bundle_dir, precision="fp32", max_image_pixels=MAX_PIXELS, max_files=4, log_requests=False
    )
    with portal_client(settings) as running:
        yield running


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


# -- the Open Inference Protocol's wire parser (issue 24) --------------------------------------------------
# "4xx or 200, never 500": every body ends as a parsed request and its input, or as a WireError (400/413)
# or an HTTPException with a 4xx; no other exception, whatever the bytes. The parser is called directly
# for thousands of cases, then the app for a few hundred.
MAX_FILES = 4
FUZZ_WIRE = settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
FUZZ_APP = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
)
B64_PNG = base64.b64encode(SEEDS["photo.png"]).decode()


def either(valid: st.SearchStrategy, invalid: st.SearchStrategy = json_values) -> st.SearchStrategy:
    """Mostly what the protocol expects (so that the parser goes deep), sometimes anything."""
    return st.one_of(valid, valid, valid, invalid)


dims = st.one_of(st.integers(-2, 5), st.just(32), st.just(3), st.integers(0, 10**30))
shapes = either(st.one_of(st.lists(dims, max_size=5), st.just([1]), st.just([1, 32, 32, 3])))


def _one_image_of_pixels(value: int, position: int, odd: Any) -> list[Any]:
    """3072 values (one image's worth), one of them maybe out of range or of another type."""
    data: list[Any] = [value] * 3072
    data[position] = odd
    return data


pixel_data = st.one_of(
    st.builds(
        _one_image_of_pixels, st.integers(0, 255), st.integers(0, 3071), st.one_of(st.integers(-1, 256), json_scalars)
    ),
    st.lists(st.integers(0, 255), max_size=20),
    st.just([[[[0, 0, 0]] * 32] * 32]),
)
image_data = st.lists(st.one_of(st.just(B64_PNG), st.text(max_size=12)), max_size=5)
parameter_sets = either(
    st.fixed_dictionaries(
        {}, optional={"binary_data_size": either(st.integers(-1, 64)), "binary_data_output": json_scalars}
    )
)
tensors = st.fixed_dictionaries(
    {
        "name": either(st.sampled_from(["image", "pixels"])),
        "datatype": either(st.sampled_from(["BYTES", "UINT8", "FP32"])),
        "shape": shapes,
    },
    optional={"data": either(st.one_of(pixel_data, image_data)), "parameters": parameter_sets},
)
outputs = st.fixed_dictionaries(
    {"name": either(st.sampled_from(["probabilities", "label", "logits"]))},
    optional={"parameters": either(st.fixed_dictionaries({}, optional={"binary_data": json_scalars}))},
)
requests = st.fixed_dictionaries(
    {"inputs": either(st.lists(tensors, max_size=3))},
    optional={"outputs": either(st.lists(outputs, max_size=3)), "id": json_scalars, "parameters": parameter_sets},
)


@st.composite
def _valid_request(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(1, MAX_FILES))
    if draw(st.booleans()):
        tensor = {"name": "image", "datatype": "BYTES", "shape": [count], "data": [B64_PNG] * count}
    else:
        value = draw(st.integers(0, 255))
        tensor = {"name": "pixels", "datatype": "UINT8", "shape": [count, 32, 32, 3], "data": [value] * (3072 * count)}
    request: dict[str, Any] = {"inputs": [tensor]}
    names = st.sampled_from(["probabilities", "label"])
    outputs = st.lists(st.fixed_dictionaries({"name": names}, optional={"parameters": st.just({"binary_data": False})}))
    if draw(st.booleans()):
        request["outputs"] = draw(outputs)
    if draw(st.booleans()):
        request["id"] = draw(st.text(max_size=8))
    return request


valid_requests = _valid_request()


@st.composite
def wire_bodies(draw: st.DrawFn) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length): JSON requests, binary ones, mutated and random bytes."""
    kind = draw(st.sampled_from(["valid", "json", "binary", "mutated", "random"]))
    if kind == "valid":  # the parser's whole way through, to an answer
        return json.dumps(draw(valid_requests)).encode(), None
    head = json.dumps(draw(requests)).encode()
    if kind == "json":
        return head, None
    if kind == "random":
        return draw(st.binary(max_size=256)), draw(st.one_of(st.none(), st.text(max_size=6)))
    if kind == "mutated":
        data = bytearray(head)
        for _ in range(draw(st.integers(1, 6))):
            if data:
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data), None
    element = draw(st.sampled_from([SEEDS["photo.png"], b"", b"junk"]))
    tail = draw(st.one_of(st.just(len(element).to_bytes(4, "little") + element), st.binary(max_size=40)))
    length = draw(
        st.one_of(
            st.just(str(len(head))),
            st.integers(-5, len(head) + len(tail) + 5).map(str),
            st.text(max_size=6),
            st.just("9" * 5000),
        )
    )
    return head + tail, length


def parse_or_refuse(body: bytes, header_length: str | None) -> None:
    """The parser's contract, which the endpoint turns into 200 or 4xx."""
    try:
        infer_request = parse_request(*split_body(body, header_length, json_value_limit(MAX_FILES)))
        tensor = read_input(infer_request, MAX_FILES)
    except WireError as exc:
        assert exc.status_code in (400, 413) and str(exc)
        return
    except HTTPException as exc:
        assert 400 <= exc.status_code < 500
        return
    assert (tensor.files is None) != (tensor.pixels is None)
    assert 1 <= len(tensor.files or tensor.pixels or []) <= MAX_FILES


@FUZZ_WIRE
@given(body=wire_bodies())
def test_the_wire_parser_answers_every_body_with_a_request_or_a_4xx(body: tuple[bytes, str | None]) -> None:
    parse_or_refuse(*body)


@FUZZ_WIRE
@given(value=json_values)
def test_any_json_value_is_a_request_or_a_4xx(value: Any) -> None:
    parse_or_refuse(json.dumps(value).encode(), None)


@FUZZ_WIRE
@given(head=st.binary(max_size=64), length=st.one_of(st.none(), st.text(max_size=8), st.integers().map(str)))
def test_random_bytes_and_header_lengths_are_a_request_or_a_4xx(head: bytes, length: str | None) -> None:
    parse_or_refuse(head, length)


@FUZZ_WIRE
@given(data=st.binary(max_size=200), count=st.integers(1, MAX_FILES))
def test_binary_bytes_elements_split_or_refuse(data: bytes, count: int) -> None:
    try:
        elements = split_bytes_elements(data, "input 'image'", count)
    except WireError:
        return
    assert len(elements) <= count and sum(4 + len(e) for e in elements) == len(data)


# -- through the app: the protocol's infer and every query parameter, on the null engine ---------------------
@pytest.fixture(scope="module")
def null_client(bundle_dir: Path) -> Iterator[PortalClient]:
    settings = Settings(model_dir=bundle_dir, engine="null", max_files=MAX_FILES, log_requests=False)
    with portal_client(settings) as running:
        yield running


def assert_200_or_4xx(response: httpx.Response, key: str) -> None:
    """A whole answer (the body arrived), 200 or a 4xx in the endpoint's error shape, never a 5xx."""
    event(f"status {response.status_code}")  # --hypothesis-show-statistics: both kinds of answer are reached
    assert response.status_code == 200 or 400 <= response.status_code < 500, (response.status_code, response.text)
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
        if response.status_code != 200:
            assert key in body, body


@FUZZ_APP
@given(body=wire_bodies())
def test_infer_answers_200_or_4xx(null_client: PortalClient, body: tuple[bytes, str | None]) -> None:
    content, length = body
    # As bytes: any text a client could put there (the server reads header bytes as latin-1)
    headers = {} if length is None else {"Inference-Header-Content-Length": length.encode()}
    response = null_client.post("/v2/models/test-bundle/infer", content=content, headers=headers)
    assert_200_or_4xx(response, "error")


query_text = st.one_of(
    st.text(max_size=12),
    st.integers(-(10**6), 10**6).map(str),
    st.floats().map(str),
    st.sampled_from(["9" * 5000, "1e999", "nan", "-inf", "0x10", "²", "1_000", " 3", "3 ", "\x00"]),
)
gradcam_params = st.fixed_dictionaries(
    {},
    optional={
        "layer": either(st.sampled_from(["layer1", "layer2", "layer3", "layer4"]), query_text),
        "method": either(st.sampled_from(["gradcam", "hirescam", "gradcampp", "xgradcam", "layercam"]), query_text),
        "target": either(st.sampled_from(["cat", "0", "9", "-1", "10", "CAT"]), query_text),
        "opacity": either(st.sampled_from(["0", "0.5", "1"]), query_text),
        "format": either(st.sampled_from(["json", "png"]), query_text),
        "faithfulness": either(st.sampled_from(["road"]), query_text),
        "extra": query_text,
    },
)


@FUZZ_APP
@given(params=gradcam_params)
def test_gradcam_query_parameters_answer_200_or_4xx(null_client: PortalClient, params: dict[str, str]) -> None:
    files = [("files", ("a.png", SEEDS["photo.png"], "image/png"))]
    assert_200_or_4xx(null_client.post("/gradcam", params=params, files=files), "detail")


@FUZZ_APP
@given(
    top_k=either(st.integers(1, 10).map(str), query_text),
    extra=st.dictionaries(st.text(max_size=6), query_text, max_size=2),
)
def test_predict_query_parameters_answer_200_or_4xx(null_client: PortalClient, top_k: str, extra: dict) -> None:
    files = [("files", ("a.png", SEEDS["photo.png"], "image/png"))]
    assert_200_or_4xx(null_client.post("/predict", params={**extra, "top_k": top_k}, files=files), "detail")


GET_PATHS = ["/misclassified", "/health", "/readyz", "/v2/models/test-bundle", "/v2/models/test-bundle/ready"]


@FUZZ_APP
@given(path=st.sampled_from(GET_PATHS), params=st.dictionaries(st.sampled_from(["n", "x"]), query_text, max_size=2))
def test_get_query_parameters_answer_200_or_4xx(null_client: PortalClient, path: str, params: dict) -> None:
    response = null_client.get(path, params=params)
    assert_200_or_4xx(response, "error" if path.startswith("/v2") else "detail")

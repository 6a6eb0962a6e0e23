"""Client input that once made a 500 or held the event loop (issue 24), in process.

Four requests got a 500 with two tracebacks each: ``/gradcam?target=`` of 5,000 digits and an
``Inference-Header-Content-Length`` of 5,000 digits (Python's int-digits limit), a JSON body nested
100,000 deep on infer and on the repository load (RecursionError). Each is now a 4xx in its
endpoint's error shape. And Open Inference Protocol bodies whose work grows with a count (4 million
empty BYTES elements, 5.4 million empty JSON arrays) are refused once the count passes the limit,
before the work, with the parse and split done off the event loop.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import encode, random_image

from service.app import create_app
from service.oip import inference, wire
from service.oip.tensors import json_value_limit
from service.oip.wire import WireError, WireTooLarge, json_object, split_body, split_bytes_elements
from service.settings import Settings

MODEL = "test-bundle"  # helpers.make_bundle's name
INFER = f"/v2/models/{MODEL}/infer"
LOAD = f"/v2/repository/models/{MODEL}/load"
DEEP = b"[" * 100_000 + b"]" * 100_000
PNG = encode(random_image(0))
MAX_FILES = 4


@pytest.fixture
async def client(bundle_dir: Path):
    settings = Settings(model_dir=bundle_dir, engine="null", max_files=MAX_FILES, log_requests=False)
    app = create_app(settings)
    # raise_app_exceptions=False: a bug must come back as the 500 a client would see.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://camserve") as http,
    ):
        yield http


def assert_refused(response: httpx.Response, key: str, statuses: tuple[int, ...]) -> str:
    """A 4xx of the expected status, its body the endpoint's error shape: ``{key: message}``."""
    assert response.status_code in statuses, (response.status_code, response.text[:300])
    body = response.json()
    assert set(body) == {key} and isinstance(body[key], str) and body[key], body
    return body[key]


async def test_a_target_of_5000_digits_is_a_422(client: httpx.AsyncClient) -> None:
    files = [("files", ("a.png", PNG, "image/png"))]
    for target in ("9" * 5000, "-" + "1" * 5000, "0" * 4999 + "3"):
        response = await client.post("/gradcam", params={"target": target}, files=files)
        assert "out of range" in assert_refused(response, "detail", (422,))
    # A class index with leading zeros is still that index.
    assert (await client.post("/gradcam", params={"target": "0003"}, files=files)).status_code == 200


async def test_a_header_length_of_5000_digits_is_a_400(client: httpx.AsyncClient) -> None:
    body = json.dumps({"inputs": []}).encode()
    for length in ("9" * 5000, "0" * 5000 + "2", "1" * 19):
        response = await client.post(INFER, content=body, headers={wire.HEADER_LENGTH: length})
        message = assert_refused(response, "error", (400,))
        assert "is not a length within" in message and len(message) < 200


async def test_json_nested_100000_deep_is_a_4xx_on_infer_and_on_load(client: httpx.AsyncClient) -> None:
    response = await client.post(INFER, content=DEEP, headers={"content-type": "application/json"})
    assert_refused(response, "error", (400, 413))  # more values than 4 images need, or nested too deeply
    within_the_count = b"[" * 10_000 + b"]" * 10_000
    response = await client.post(INFER, content=within_the_count, headers={"content-type": "application/json"})
    assert "nested too deeply" in assert_refused(response, "error", (400,))
    deep_object = b'{"inputs": ' + DEEP[:-1] + b"}"
    response = await client.post(INFER, content=deep_object[:50_000] + b"]" * 25_000 + b"}")
    assert_refused(response, "error", (400, 413))
    # The load endpoint: whatever else refuses it (model control, the API key), never a 500.
    response = await client.post(LOAD, content=b'{"parameters": ' + DEEP + b"}")
    assert_refused(response, "error", (400, 401, 403, 413))
    response = await client.post(LOAD, content=b"[" * 50 + b"]" * 50)
    assert_refused(response, "error", (400, 401, 403))


def test_deep_or_large_load_bodies_are_refused_by_the_parser() -> None:
    with pytest.raises(WireError, match="nested too deeply"):
        json_object(b'{"parameters": ' + DEEP + b"}", "the load request", 10**6)
    with pytest.raises(WireTooLarge):
        json_object(b'{"a": [' + b"1," * 1000 + b"1]}", "the load request", 256)
    with pytest.raises(WireTooLarge):
        json_object(b'{"a": "' + b"x" * 70_000 + b'"}', "the load request", 256, max_bytes=64 * 1024)
    assert json_object(b'{"parameters": {}}', "the load request", 256) == {"parameters": {}}


def test_a_bytes_tensor_is_split_no_further_than_its_shape() -> None:
    """4 million empty elements (16 MB) took 1.7 s to split on the loop, then were refused: now at once."""
    raw = b"\0\0\0\0" * 4_000_000
    with pytest.raises(WireError, match="more than the 1 elements"):
        split_bytes_elements(raw, "input 'image'", 1)
    assert split_bytes_elements(b"\x01\0\0\0a\x02\0\0\0bc", "x", 2) == [b"a", b"bc"]


def test_json_with_more_values_than_any_request_needs_is_refused_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    """5.4 million empty arrays took 1.7 s to parse (in a thread, holding the GIL): now a 413 before parsing."""
    body = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1], "data": [' + b"[]," * 200_000 + b"[]]}]}"

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("parsed a body over the value limit")

    monkeypatch.setattr(wire.json, "loads", never)
    with pytest.raises(WireTooLarge, match="more than"):
        split_body(body, None, json_value_limit(MAX_FILES))


def test_the_value_limit_admits_the_largest_request_of_pixels() -> None:
    nested = [[[[255, 255, 255]] * 32] * 32] * MAX_FILES
    tensor = {"name": "pixels", "datatype": "UINT8", "shape": [MAX_FILES, 32, 32, 3], "data": nested}
    body = json.dumps({"id": "x", "inputs": [tensor], "outputs": [{"name": "label"}]}).encode()
    request, binary = split_body(body, None, json_value_limit(MAX_FILES))
    assert request["inputs"][0]["shape"] == [MAX_FILES, 32, 32, 3] and binary == b""


async def test_oversized_oip_bodies_get_4xx_in_the_protocols_shape(client: httpx.AsyncClient) -> None:
    empty_elements = b"\0\0\0\0" * 1_000_000
    for shape in ([1], [1_000_000]):
        head = json.dumps(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": shape,
                        "parameters": {"binary_data_size": 4_000_000},
                    }
                ]
            }
        ).encode()
        response = await client.post(INFER, content=head + empty_elements, headers={wire.HEADER_LENGTH: str(len(head))})
        assert_refused(response, "error", (400, 413))
    arrays = (
        b'{"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [' + b"[]," * 100_000 + b"[]]}]}"
    )
    assert "more than" in assert_refused(await client.post(INFER, content=arrays), "error", (413,))
    many = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["x"]}] * 100}
    assert "at most" in assert_refused(await client.post(INFER, json=many), "error", (400,))
    outputs = {"inputs": many["inputs"][:1], "outputs": [{"name": "label"}] * 100}
    assert "at most" in assert_refused(await client.post(INFER, json=outputs), "error", (400,))


async def test_a_large_body_is_parsed_and_split_off_the_event_loop(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    parse = inference._parse

    def recorded(*args: Any) -> Any:
        threads.append(threading.get_ident())
        return parse(*args)

    monkeypatch.setattr(inference, "_parse", recorded)
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [MAX_FILES, 32, 32, 3], "data": [7] * (MAX_FILES * 3072)}
    response = await client.post(INFER, json={"inputs": [pixels]})
    assert response.status_code == 200, response.text
    assert len(json.dumps({"inputs": [pixels]})) > inference.INLINE_PARSE_BYTES
    assert threads and loop_thread not in threads

"""The Open Inference Protocol (KServe V2) REST endpoints.

Answers are checked against ``/predict``'s for the same images with the real ``tritonclient`` on a
real server (JSON and binary tensors, ``image`` and ``pixels`` inputs); refusals in process.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from harness import camserve
from helpers import CLASSES, encode, random_image
from PIL import Image
from pydantic import SecretStr

from service.app import create_app
from service.settings import Settings

tritonclient_http = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http]' (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "test-bundle"  # helpers.make_bundle's name


def images(count: int) -> list[bytes]:
    """PNGs of several sizes (some resized by the service) and one JPEG."""
    out = [encode(random_image(i, size=(32 + 8 * (i % 3), 32 + 4 * (i % 2)))) for i in range(count - 1)]
    return [*out, encode(random_image(99, size=(50, 40)), "JPEG", quality=90)]


def pixels_of(data: bytes) -> np.ndarray:
    """The 32x32 RGB uint8 the service decodes a 32x32 PNG to (it is untouched at that size)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def predict_probabilities(base: str, files: list[bytes]) -> tuple[np.ndarray, str]:
    """/predict's answer as a (images, classes) array in class order, and its model_version."""
    response = httpx.post(
        f"{base}/predict",
        params={"top_k": len(CLASSES)},
        files=[("files", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(files)],
        timeout=60,
    )
    response.raise_for_status()
    body = response.json()
    table = np.zeros((len(files), len(CLASSES)), dtype=np.float32)
    for row, prediction in enumerate(body["predictions"]):
        for entry in prediction["top_k"]:
            table[row, entry["index"]] = entry["probability"]
    return table, body["model_version"]


# -- a real server and the real tritonclient ----------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("oip") / "server.log"
    with camserve(bundle_dir, log, precision="fp32", max_batch_size="8", log_requests="false") as running:
        yield running.base_url


@pytest.fixture(scope="module")
def triton(server: str):
    client = tritonclient_http.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    yield client
    client.close()


def infer(triton, name: str, array: np.ndarray, datatype: str, binary_in: bool, binary_out: bool):
    tensor = tritonclient_http.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary_in)
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=binary_out) for n in ("probabilities", "label")]
    return triton.infer(MODEL, [tensor], outputs=outputs, request_id="req-1")


@pytest.mark.server
def test_server_model_and_health_metadata(triton):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert not triton.is_model_ready("no-such-model")
    server = triton.get_server_metadata()
    assert server["name"] == "camserve" and "binary_tensor_data" in server["extensions"]
    meta = triton.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and len(meta["versions"]) == 1 and len(meta["versions"][0]) == 64
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "image": ("BYTES", [-1]),
        "pixels": ("UINT8", [-1, 32, 32, 3]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "label": ("BYTES", [-1]),
    }


@pytest.mark.server
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, False), (True, False), (False, True)])
def test_image_input_answers_equal_predict(server, triton, binary_in, binary_out):
    files = images(5)
    expected, version = predict_probabilities(server, files)
    # As JSON, BYTES elements are strings: the image files go base64-encoded; in binary, as they are.
    elements = [data if binary_in else base64.b64encode(data) for data in files]
    result = infer(triton, "image", np.array(elements, dtype=np.object_), "BYTES", binary_in, binary_out)
    response = result.get_response()
    assert response["model_name"] == MODEL and response["model_version"] == version and response["id"] == "req-1"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [CLASSES[i] for i in expected.argmax(1)]


@pytest.mark.server
@pytest.mark.parametrize("binary", [True, False])
def test_pixels_input_answers_equal_predict(server, triton, binary):
    files = [encode(random_image(200 + i)) for i in range(3)]  # 32x32 PNGs: decoded pixels are exactly these
    expected, _ = predict_probabilities(server, files)
    batch = np.stack([pixels_of(data) for data in files])
    result = infer(triton, "pixels", batch, "UINT8", binary, binary)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)


@pytest.mark.server
def test_default_request_of_tritonclient_is_binary_both_ways(server, triton):
    """No outputs named: tritonclient asks for every output in binary (``binary_data_output``)."""
    tensor = tritonclient_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array(images(1), dtype=np.object_))
    result = triton.infer(MODEL, [tensor])
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert set(outputs) == {"probabilities", "label"}
    assert outputs["probabilities"]["parameters"]["binary_data_size"] == 40
    assert result.as_numpy("probabilities").shape == (1, 10)


@pytest.mark.server
def test_tritonclient_sees_protocol_errors(triton):
    tensor = tritonclient_http.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"not an image"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"image\[0\]: not an image") as caught:
        triton.infer(MODEL, [tensor])
    assert caught.value.status() == "400"


# -- refusals, in process ------------------------------------------------------------------------------
@pytest.fixture
async def client(bundle_dir: Path):
    settings = Settings(
        model_dir=bundle_dir,
        precision="fp32",
        max_batch_size=4,
        max_files=4,
        max_upload_bytes=200_000,
        max_image_pixels=1_000_000,
        log_requests=False,
        api_key=SecretStr("sesame"),
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://camserve", headers={"X-API-Key": "sesame"}
        ) as client,
    ):
        yield client


def image_json(*elements: str, shape: list[int] | None = None, datatype: str = "BYTES") -> dict:
    return {
        "inputs": [{"name": "image", "datatype": datatype, "shape": shape or [len(elements)], "data": list(elements)}]
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def binary_body(header: dict, binary: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + binary, {"Inference-Header-Content-Length": str(len(head))}


PNG = encode(random_image(0))
PIXELS = {"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3]}


# (request body, status, what the error must say); one app for all: each start traces and warms a model.
BAD_TENSORS = [
    (image_json(b64(PNG), datatype="FP32"), 400, "datatype FP32, expected BYTES"),
    (image_json(b64(PNG), shape=[1, 1]), 400, r"expected \[-1\]"),
    (image_json(b64(PNG), shape=[2]), 400, r"shape \[2\] but 1 elements"),
    (image_json(shape=[0]), 400, "no images"),
    (image_json("%%%"), 400, r"image\[0\]: not base64"),
    (image_json(b64(b"GIF89a junk")), 400, r"image\[0\]: "),
    (image_json(b64(b"hello")), 400, r"image\[0\]: not an image"),
    (image_json(*[b64(PNG)] * 5), 413, "at most 4 per request"),
    ({"inputs": [{**PIXELS, "data": [0] * 3071}]}, 400, "3071 values"),
    ({"inputs": [{**PIXELS, "data": [256] * 3072}]}, 400, "integers 0..255"),
    ({"inputs": [{**PIXELS, "data": [0.5] * 3072}]}, 400, "integers 0..255"),
    ({"inputs": [{**PIXELS, "data": [[0, 1], [2]]}]}, 400, "3 values"),
    ({"inputs": [{**PIXELS, "shape": [1, 32, 32], "data": [0] * 3072}]}, 400, "expected"),
    ({"inputs": [{**PIXELS, "datatype": "INT32", "data": [0] * 3072}]}, 400, "expected UINT8"),
    ({"inputs": [{"name": "tensor", "datatype": "FP32", "shape": [1], "data": [1]}]}, 400, "unknown input"),
    ({"inputs": []}, 400, "non-empty list"),
    ({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, 400, "neither 'data'"),
    ({**image_json(b64(PNG)), "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    ({**image_json(b64(PNG)), "parameters": {"binary_data_output": "yes"}}, 400, "true or false"),
    ([1, 2], 400, "JSON object"),
]


async def test_bad_tensors_get_a_4xx_in_the_protocols_shape(client):
    for body, status, message in BAD_TENSORS:
        response = await client.post(f"/v2/models/{MODEL}/infer", json=body)
        assert response.status_code == status, (message, response.text)
        assert set(response.json()) == {"error"}
        assert re.search(message, response.json()["error"]), (message, response.json())
    assert (await client.get("/v2/health/ready")).status_code == 200
    good = await client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [{**PIXELS, "data": [7] * 3072}]})
    assert good.status_code == 200


async def test_bad_binary_framing_is_refused(client):
    url = f"/v2/models/{MODEL}/infer"
    raw = (len(PNG)).to_bytes(4, "little") + PNG
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
    cases = [
        (*binary_body(header, raw[:9]), "runs past the tensor's end"),  # element length beyond its 9 bytes
        (*binary_body(header, raw[:5]), "runs past the 5 bytes left"),
        (*binary_body(header, raw[:9] + b"x"), "1 bytes of binary data after"),
        (b"{}", {"Inference-Header-Content-Length": "99"}, "not a length within"),
        (b"{}", {"Inference-Header-Content-Length": "-1"}, "not a length within"),
    ]
    pixels_header = {"inputs": [{**PIXELS, "parameters": {"binary_data_size": 3000}}]}
    cases.append((*binary_body(pixels_header, bytes(3000)), "3000 bytes for shape"))
    for content, headers, message in cases:
        response = await client.post(url, content=content, headers=headers)
        assert response.status_code == 400 and message in response.json()["error"], (message, response.text)
    good = {"inputs": [{**header["inputs"][0], "parameters": {"binary_data_size": len(raw)}}]}
    response = await client.post(url, content=binary_body(good, raw)[0], headers=binary_body(good, raw)[1])
    assert response.status_code == 200 and response.json()["outputs"][1]["data"][0] in CLASSES


async def test_protocol_error_shape_for_auth_model_name_size_and_encoding(client):
    body = image_json(b64(PNG))
    unauthorized = await client.post(f"/v2/models/{MODEL}/infer", json=body, headers={"X-API-Key": "wrong"})
    assert unauthorized.status_code == 401 and "API key" in unauthorized.json()["error"]
    unknown = await client.post("/v2/models/resnet50/infer", json=body)
    assert unknown.status_code == 404 and "unknown model 'resnet50'" in unknown.json()["error"]
    wrong_version = await client.post(f"/v2/models/{MODEL}/versions/7/infer", json=body)
    assert wrong_version.status_code == 404 and "no version '7'" in wrong_version.json()["error"]
    too_large = await client.post(f"/v2/models/{MODEL}/infer", content=b"x" * 200_001)
    assert too_large.status_code == 413 and "exceeds the limit" in too_large.json()["error"]
    compressed = await client.post(f"/v2/models/{MODEL}/infer", content=b"x", headers={"Content-Encoding": "gzip"})
    assert compressed.status_code == 415 and "uncompressed" in compressed.json()["error"]
    assert (await client.get("/v2/models/resnet50")).json() == {
        "error": f"unknown model 'resnet50'; this server serves '{MODEL}' and '{MODEL}-cam'"
    }
    # The service's own API keeps its own error shape.
    assert "detail" in (await client.post("/predict", headers={"X-API-Key": "wrong"})).json()


async def test_versioned_paths_and_json_answer(client):
    meta = (await client.get(f"/v2/models/{MODEL}")).json()
    version = meta["versions"][0]
    assert (await client.get(f"/v2/models/{MODEL}/versions/{version}/ready")).status_code == 200
    response = await client.post(f"/v2/models/{MODEL}/versions/{version}/infer", json=image_json(b64(PNG), b64(PNG)))
    body = response.json()
    assert body["model_version"] == version
    probabilities = next(o for o in body["outputs"] if o["name"] == "probabilities")
    assert probabilities["shape"] == [2, 10] and len(probabilities["data"]) == 20
    assert abs(sum(probabilities["data"][:10]) - 1) < 1e-5 and probabilities["data"][:10] == probabilities["data"][10:]

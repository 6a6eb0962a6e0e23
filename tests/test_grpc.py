"""The Open Inference Protocol over gRPC (service/grpc/).

An app runs in process with its lifespan (Starlette's TestClient, on a loop of its own in another
thread), its gRPC server on a port the kernel gave; the real ``tritonclient.grpc`` talks to it, and a
plain channel with camserve's own messages sends what tritonclient cannot (typed contents, bad
framing). Answers are compared with ``/predict``'s for the same images, from the same app.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import free_port
from helpers import CLASSES, encode, random_image
from PIL import Image
from pydantic import SecretStr
from test_oip import images, pixels_of

from service.app import create_app
from service.grpc import inference_pb2 as pb
from service.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' (dev extra)")
from tritonclient.grpc import service_pb2 as triton_pb2  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test-bundle"  # helpers.make_bundle's name
KEY = "sesame"
AUTH = (("x-api-key", KEY),)
SERVICE = "/inference.GRPCInferenceService/"


# -- the generated module and the protocol's definition -----------------------------------------------
@pytest.mark.server  # protoc runs as a process of its own
def test_the_committed_module_is_what_make_proto_makes(tmp_path: Path):
    pytest.importorskip("grpc_tools", reason="pip install grpcio-tools (dev extra)")
    source = tmp_path / "service" / "grpc"
    source.mkdir(parents=True)
    shutil.copy(ROOT / "service/grpc/inference.proto", source)
    command = [sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "service/grpc/inference.proto"]
    subprocess.run(command, cwd=tmp_path, check=True, timeout=120)
    made = (source / "inference_pb2.py").read_text()
    made = made.replace(
        "_descriptor_pool.Default().AddSerializedFile", "_descriptor_pool.DescriptorPool().AddSerializedFile"
    )
    assert made == (ROOT / "service/grpc/inference_pb2.py").read_text(), "run `make proto` and commit the result"


def _fields(message) -> dict[str, tuple]:
    return {
        f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None)
        for f in message.fields
    }


def test_messages_and_methods_are_tritons():
    """Every message camserve declares has Triton's fields (names, numbers, types), and every RPC its types,
    so tritonclient and camserve read each other's bytes; camserve's messages live in a pool of their own."""
    ours = pb.DESCRIPTOR
    theirs = triton_pb2.DESCRIPTOR
    assert ours.package == theirs.package == "inference"
    assert ours.pool is not theirs.pool  # both importable in one process
    pending = list(ours.message_types_by_name.values())
    while pending:
        message = pending.pop()
        pending.extend(message.nested_types)
        if message.GetOptions().map_entry:
            continue
        triton = theirs.pool.FindMessageTypeByName(message.full_name)
        assert _fields(message) == _fields(triton), message.full_name
    service = ours.services_by_name["GRPCInferenceService"]
    triton_service = theirs.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        triton_method = triton_service.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            triton_method.input_type.full_name,
            triton_method.output_type.full_name,
        )
    assert len(service.methods) == 8


# -- one app, in process, for the rest -------------------------------------------------------------
@pytest.fixture(scope="module")
def app_and_port(bundle_dir: Path):
    port = free_port()
    settings = Settings(
        model_dir=bundle_dir,
        precision="fp32",
        max_batch_size=8,
        max_files=4,
        max_upload_bytes=200_000,
        log_requests=False,
        api_key=SecretStr(KEY),
        grpc_port=port,
    )
    app = create_app(settings)
    with TestClient(app, headers={"X-API-Key": KEY}) as client:
        yield app, client, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def rest(app_and_port) -> TestClient:
    return app_and_port[1]


@pytest.fixture(scope="module")
def state(app_and_port):
    return app_and_port[0].state.camserve


@pytest.fixture(scope="module")
def triton(app_and_port):
    client = grpcclient.InferenceServerClient(app_and_port[2])
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(app_and_port):
    with grpc.insecure_channel(app_and_port[2]) as channel:
        yield channel


def call(channel, method: str, request, response_type, metadata=AUTH):
    rpc = channel.unary_unary(
        SERVICE + method,
        request_serializer=type(request).SerializeToString,
        response_deserializer=response_type.FromString,
    )
    return rpc(request, metadata=metadata, timeout=60)


def infer(channel, request: pb.ModelInferRequest, metadata=AUTH) -> pb.ModelInferResponse:
    return call(channel, "ModelInfer", request, pb.ModelInferResponse, metadata)


def typed_request(name: str, datatype: str, shape: list[int], model: str = MODEL, **contents) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(tensor.contents, field).extend(values)
    return request


def refused(channel, request, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        infer(channel, request, metadata)
    return caught.value


def predict_probabilities(rest: TestClient, files: list[bytes]) -> np.ndarray:
    response = rest.post(
        "/predict",
        params={"top_k": len(CLASSES)},
        files=[("files", (f"{i}", data, "application/octet-stream")) for i, data in enumerate(files)],
    )
    response.raise_for_status()
    table = np.zeros((len(files), len(CLASSES)), dtype=np.float32)
    for row, prediction in enumerate(response.json()["predictions"]):
        for entry in prediction["top_k"]:
            table[row, entry["index"]] = entry["probability"]
    return table


def raw_output(response: pb.ModelInferResponse, name: str) -> bytes:
    index = [o.name for o in response.outputs].index(name)
    return response.raw_output_contents[index]


# -- health, metadata, inference with tritonclient -------------------------------------------------
def test_health_and_metadata(triton, channel):
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(MODEL)
    assert triton.is_model_ready(MODEL + "-cam") and not triton.is_model_ready("no-such-model")
    server = triton.get_server_metadata(as_json=True)
    assert server["name"] == "camserve" and server["extensions"] == ["model_repository"]
    meta = triton.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and len(meta["versions"]) == 1 and len(meta["versions"][0]) == 64
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "image": ("BYTES", ["-1"]),
        "pixels": ("UINT8", ["-1", "32", "32", "3"]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "probabilities": ("FP32", ["-1", "10"]),
        "label": ("BYTES", ["-1"]),
    }
    with pytest.raises(InferenceServerException, match="unknown model 'resnet50'") as caught:
        triton.get_model_metadata("resnet50")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "inference.GRPCInferenceService"):
        assert (
            health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        )


def test_image_input_answers_equal_predict(rest, triton, channel):
    files = images(5)[1:]  # four: the per-request limit of this app
    expected = predict_probabilities(rest, files)
    version = rest.get(f"/v2/models/{MODEL}").json()["versions"][0]
    tensor = grpcclient.InferInput("image", [len(files)], "BYTES")
    tensor.set_data_from_numpy(np.array(files, dtype=np.object_))  # raw_input_contents, as tritonclient sends
    result = triton.infer(MODEL, [tensor], request_id="req-1", headers={"x-api-key": KEY})
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (MODEL, version, "req-1")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (4, 10)
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-6)
    assert [label.decode() for label in result.as_numpy("label")] == [CLASSES[i] for i in expected.argmax(1)]
    # The same images in typed contents (bytes_contents), through a plain channel: the same answer.
    typed = infer(channel, typed_request("image", "BYTES", [len(files)], bytes_contents=files))
    assert [o.name for o in typed.outputs] == ["probabilities", "label"]
    np.testing.assert_array_equal(
        np.frombuffer(raw_output(typed, "probabilities"), "<f4").reshape(4, 10), probabilities
    )


def test_pixels_input_raw_and_typed(rest, triton, channel):
    files = [encode(random_image(300 + i)) for i in range(3)]  # 32x32 PNGs: decoded pixels are exactly these
    expected = predict_probabilities(rest, files)
    batch = np.stack([pixels_of(data) for data in files])
    tensor = grpcclient.InferInput("pixels", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch)
    outputs = [grpcclient.InferRequestedOutput("probabilities")]
    result = triton.infer(MODEL, [tensor], outputs=outputs, headers={"authorization": f"Bearer {KEY}"})
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    assert [o.name for o in result.get_response().outputs] == ["probabilities"]
    typed = infer(channel, typed_request("pixels", "UINT8", list(batch.shape), uint_contents=batch.ravel().tolist()))
    np.testing.assert_allclose(
        np.frombuffer(raw_output(typed, "probabilities"), "<f4").reshape(3, 10), expected, atol=1e-6
    )


# -- refusals as status codes ------------------------------------------------------------------------
PNG = encode(random_image(0))
BAD = [
    (typed_request("image", "FP32", [1], bytes_contents=[PNG]), "datatype FP32, expected BYTES"),
    (typed_request("image", "BYTES", [1, 1], bytes_contents=[PNG]), r"expected \[-1\]"),
    (typed_request("image", "BYTES", [2], bytes_contents=[PNG]), r"shape \[2\] but 1 elements"),
    (typed_request("image", "BYTES", [0]), "no images"),
    (typed_request("image", "BYTES", [1], bytes_contents=[b"hello"]), r"image\[0\]: not an image"),
    (typed_request("image", "BYTES", [1], bytes_contents=[b"GIF89a junk"]), r"image\[0\]: "),
    (typed_request("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[0] * 3071), "3071 values"),
    (typed_request("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[256] * 3072), "integers 0..255"),
    (typed_request("pixels", "UINT8", [1, 32, 32, 3], int_contents=[1] * 3072), "0 values"),
    (typed_request("pixels", "INT32", [1, 32, 32, 3]), "expected UINT8"),
    (typed_request("tensor", "FP32", [1]), "unknown input"),
    (typed_request("image", "BYTES", [-1], bytes_contents=[PNG]), "negative dimension"),
    (pb.ModelInferRequest(model_name=MODEL), r"exactly one input.*got 0"),
]


def _raw_requests() -> list[tuple[pb.ModelInferRequest, str]]:
    cases = []
    truncated = typed_request("image", "BYTES", [1])
    truncated.raw_input_contents.append(len(PNG).to_bytes(4, "little") + PNG[:10])
    cases.append((truncated, "runs past the tensor's end"))
    both = typed_request("image", "BYTES", [1], bytes_contents=[PNG])
    both.raw_input_contents.append(b"")
    cases.append((both, "both contents and raw_input_contents"))
    short = typed_request("pixels", "UINT8", [1, 32, 32, 3])
    short.raw_input_contents.append(bytes(3000))
    cases.append((short, "3000 bytes for shape"))
    extra = typed_request("pixels", "UINT8", [1, 32, 32, 3])
    extra.raw_input_contents.extend([bytes(3072), b"x"])
    cases.append((extra, "2 raw_input_contents for 1 inputs"))
    outputs = typed_request("image", "BYTES", [1], bytes_contents=[PNG])
    outputs.outputs.add(name="logits")
    cases.append((outputs, "unknown output"))
    return cases


def test_bad_tensors_are_invalid_argument(channel):
    for request, message in [*BAD, *_raw_requests()]:
        error = refused(channel, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (message, error.details())
        assert re.search(message, error.details()), (message, error.details())
    good = infer(channel, typed_request("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[7] * 3072))
    assert len(good.raw_output_contents) == 2


def test_bytes_that_are_no_message_are_invalid_argument(channel):
    for garbage in (b"\xff\xff\xff", b"\x0a\x05ab"):  # a bad tag; a string field cut short
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary(SERVICE + "ModelInfer")(garbage, metadata=AUTH, timeout=60)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        channel.unary_unary(SERVICE + "ModelConfig")(b"", timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_key_model_and_size_refusals(channel, triton):
    request = typed_request("image", "BYTES", [1], bytes_contents=[PNG])
    for metadata in ((), (("x-api-key", "wrong"),), (("authorization", "Basic sesame"),)):
        error = refused(channel, request, metadata)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in error.details()
    assert triton.is_server_ready()  # health and metadata are open, as over REST
    unknown = refused(channel, typed_request("image", "BYTES", [1], model="resnet50", bytes_contents=[PNG]))
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and "unknown model 'resnet50'" in unknown.details()
    versioned = typed_request("image", "BYTES", [1], bytes_contents=[PNG])
    versioned.model_version = "7"
    assert refused(channel, versioned).code() == grpc.StatusCode.NOT_FOUND
    too_many = refused(channel, typed_request("image", "BYTES", [5], bytes_contents=[PNG] * 5))
    assert too_many.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "at most 4 per request" in too_many.details()
    too_large = refused(channel, typed_request("image", "BYTES", [1], bytes_contents=[b"x" * 200_001]))
    assert too_large.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    huge = io.BytesIO()
    Image.new("L", (6000, 5000)).save(huge, "PNG")  # 29 kB that would decode to 30 MP, over the 25 MP limit
    pixels = refused(channel, typed_request("image", "BYTES", [1], bytes_contents=[huge.getvalue()]))
    assert pixels.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds the limit" in pixels.details()


def test_unavailable_when_the_queue_is_full_or_the_service_drains(channel, triton, state):
    request = typed_request("image", "BYTES", [1], bytes_contents=[PNG])
    batcher = state.batchers["predict"]
    size = batcher.queue_size
    batcher.queue_size = 0
    try:
        full = refused(channel, request)
    finally:
        batcher.queue_size = size
    assert full.code() == grpc.StatusCode.UNAVAILABLE and "predict queue is full" in full.details()
    assert dict(full.trailing_metadata())["grpc-retry-pushback-ms"] == "1000"
    state.draining = True
    try:
        draining = refused(channel, request)
        assert not triton.is_server_ready() and not triton.is_model_ready(MODEL)
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        state.draining = False
    assert draining.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in draining.details()
    assert triton.is_server_ready()


def test_calls_are_counted_in_the_metrics(rest, channel):
    def count(status: str) -> float:
        pattern = rf'camserve_requests_total\{{endpoint="grpc ModelInfer",method="gRPC",status="{status}"\}} (\S+)'
        found = re.search(pattern, rest.get("/metrics").text)
        return float(found.group(1)) if found else 0.0

    ok, bad = count("OK"), count("INVALID_ARGUMENT")
    infer(channel, typed_request("pixels", "UINT8", [1, 32, 32, 3], uint_contents=[9] * 3072))
    refused(channel, typed_request("image", "FP32", [1]))
    assert (count("OK"), count("INVALID_ARGUMENT")) == (ok + 1, bad + 1)
    assert 'camserve_images_total{endpoint="/predict"}' in rest.get("/metrics").text


def test_repository_index_and_load_under_model_control(channel, triton, state):
    index = triton.get_model_repository_index(headers={"x-api-key": KEY}, as_json=True)["models"]
    assert [m["name"] for m in index] == [MODEL, MODEL + "-cam"] and {m["state"] for m in index} == {"READY"}
    with pytest.raises(InferenceServerException, match="CAMSERVE_MODEL_CONTROL") as caught:
        triton.load_model(MODEL, headers={"x-api-key": KEY})
    assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
    with pytest.raises(InferenceServerException) as caught:
        triton.get_model_repository_index()
    assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
    before = state.engine
    state.settings.model_control = True
    try:
        with pytest.raises(InferenceServerException, match="no parameters"):
            triton.load_model(MODEL, headers={"x-api-key": KEY}, config='{"backend": "onnx"}')
        with pytest.raises(InferenceServerException) as caught:
            triton.load_model("resnet50", headers={"x-api-key": KEY})
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        triton.load_model(MODEL, headers={"x-api-key": KEY})
    finally:
        state.settings.model_control = False
    assert state.engine is not before and state.engine.bundle.version == before.bundle.version


# -- drain: a call in flight when the service stops still gets its answer --------------------------
async def test_a_call_in_flight_at_shutdown_is_answered_and_new_ones_are_refused(bundle_dir: Path):
    aio = pytest.importorskip("tritonclient.grpc.aio")
    port = free_port()
    settings = Settings(
        model_dir=bundle_dir, engine="null", null_batch_ms=1500, log_requests=False, grpc_port=port, max_batch_size=4
    )
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    state = app.state.camserve
    client = aio.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        tensor = aio.InferInput("pixels", [1, 32, 32, 3], "UINT8")
        tensor.set_data_from_numpy(np.zeros((1, 32, 32, 3), np.uint8))
        in_flight = asyncio.ensure_future(client.infer(MODEL, [tensor]))
        for _ in range(500):  # until its batch runs (bounded: 10 s)
            if state.batchers["predict"]._running:
                break
            await asyncio.sleep(0.02)
        assert state.batchers["predict"]._running, "the call never reached the model"
        stopping = asyncio.ensure_future(lifespan.__aexit__(None, None, None))
        for _ in range(500):
            if state.draining:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(MODEL, [tensor])
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        result = await in_flight
        assert result.as_numpy("probabilities").shape == (1, 10)
        await stopping
    finally:
        await client.close()


# -- every worker serves gRPC on the one port ----------------------------------------------------------
@pytest.mark.server
def test_every_worker_of_a_multi_worker_service_answers_grpc(bundle_dir: Path, tmp_path: Path):
    from harness import camserve

    port = free_port()
    settings = {"workers": 2, "engine": "null", "grpc_port": port, "log_requests": "true"}
    with camserve(bundle_dir, tmp_path / "server.log", **settings) as running:
        deadline = time.monotonic() + 120  # /readyz answered for one worker: wait for both (each binds gRPC)
        while httpx.get(f"{running.base_url}/readyz", timeout=10).json().get("workers_ready", 0) < 2:
            assert time.monotonic() < deadline, "two workers never became ready"
            time.sleep(0.2)
        for i in range(24):  # a new connection each: the kernel spreads them over the workers (SO_REUSEPORT)
            client = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
            tensor = grpcclient.InferInput("pixels", [1, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(np.full((1, 32, 32, 3), i, np.uint8))
            assert client.infer(MODEL, [tensor]).as_numpy("probabilities").shape == (1, 10)
            client.close()
        lines = [line[line.index("{") :] for line in running.log_path.read_text().splitlines() if '"gRPC"' in line]
    # Each worker numbers its requests after a random prefix of its own: two prefixes, two workers.
    prefixes = {json.loads(line)["request_id"][:16] for line in lines}
    assert len(lines) == 24 and len(prefixes) == 2, prefixes

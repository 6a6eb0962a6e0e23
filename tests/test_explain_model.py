"""The explanation model, ``<bundle name>-cam``, over REST and gRPC: its metadata, and heatmaps, labels,
probabilities and ROAD scores equal to ``/gradcam``'s for the same images, from the same app."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from harness import free_port
from helpers import CLASSES, encode, random_image

from service.app import create_app
from service.grpc import inference_pb2 as pb
from service.settings import Settings

grpcclient = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[grpc]' (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "test-bundle-cam"  # helpers.make_bundle's name, and the suffix
INFER = f"/v2/models/{MODEL}/infer"
FILES = [encode(random_image(40 + i, size=(32 + 8 * i, 32))) for i in range(2)]


@pytest.fixture(scope="module")
def served(bundle_dir: Path):
    port = free_port()
    app = create_app(Settings(model_dir=bundle_dir, precision="fp32", max_files=4, log_requests=False, grpc_port=port))
    with TestClient(app) as client:
        triton = grpcclient.InferenceServerClient(f"127.0.0.1:{port}")
        yield client, triton, f"127.0.0.1:{port}"
        triton.close()


@pytest.fixture(scope="module")
def rest(served) -> TestClient:
    return served[0]


@pytest.fixture(scope="module")
def triton(served):
    return served[1]


def gradcam(rest: TestClient, **query) -> list[dict]:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(FILES)]
    response = rest.post("/gradcam", params=query, files=files)
    response.raise_for_status()
    return response.json()["results"]


def rest_explain(rest: TestClient, targets: list[int] | None = None, **parameters) -> dict[str, np.ndarray]:
    inputs = [
        {
            "name": "image",
            "datatype": "BYTES",
            "shape": [len(FILES)],
            "data": [base64.b64encode(f).decode() for f in FILES],
        }
    ]
    if targets is not None:
        inputs.append({"name": "target", "datatype": "INT32", "shape": [len(targets)], "data": targets})
    response = rest.post(INFER, json={"id": "e-1", "inputs": inputs, "parameters": parameters})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["id"] == "e-1"
    return {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in body["outputs"]}


def grpc_explain(triton, targets: list[int] | None = None, **parameters):
    tensor = grpcclient.InferInput("image", [len(FILES)], "BYTES")
    tensor.set_data_from_numpy(np.array(FILES, dtype=np.object_))
    inputs = [tensor]
    if targets is not None:
        target = grpcclient.InferInput("target", [len(targets)], "INT32")
        target.set_data_from_numpy(np.array(targets, dtype=np.int32))
        inputs.append(target)
    return triton.infer(MODEL, inputs, parameters=parameters or None)


def test_metadata_lists_the_inputs_outputs_and_parameters(served, rest, triton):
    meta = rest.get(f"/v2/models/{MODEL}").json()
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "image": ("BYTES", [-1]),
        "pixels": ("UINT8", [-1, 32, 32, 3]),
        "target": ("INT32", [-1]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "heatmap": ("FP32", [-1, 32, 32]),
        "label": ("BYTES", [-1]),
        "probability": ("FP32", [-1]),
        "road": ("FP32", [-1]),
    }
    parameters = meta["parameters"]
    assert parameters["method"] == {
        "allowed": ["gradcam", "hirescam", "gradcampp", "xgradcam", "layercam"],
        "default": "gradcam",
    }
    assert parameters["faithfulness"] == {"allowed": ["road"], "default": None}
    health = rest.get("/health").json()
    assert parameters["layer"]["default"] == health["gradcam"]["default_layer"]
    assert parameters["layer"]["allowed"] == [layer["name"] for layer in health["gradcam"]["layers"]]
    assert rest.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert rest.get(f"/v2/models/{MODEL}/versions/{meta['versions'][0]}").json() == meta
    # gRPC: the same metadata; the parameters, which the protocol's message has no field for, in a header.
    ours = triton.get_model_metadata(MODEL, as_json=True)
    assert [t["name"] for t in ours["outputs"]] == ["heatmap", "label", "probability", "road"]
    with grpc.insecure_channel(served[2]) as channel:
        rpc = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata",
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        _, call = rpc.with_call(pb.ModelMetadataRequest(name=MODEL), timeout=30)
        assert json.loads(dict(call.initial_metadata())["camserve-parameters"]) == parameters
    index = [m["name"] for m in rest.post("/v2/repository/index").json()]
    assert index == ["test-bundle", MODEL]


@pytest.mark.parametrize(("layer", "method"), [(None, None), ("layer2", "hirescam"), ("layer1", "gradcampp")])
def test_heatmaps_equal_gradcams_over_rest_and_grpc(rest, triton, layer, method):
    parameters = {k: v for k, v in {"layer": layer, "method": method}.items() if v}
    query = {**parameters, "target": "3"}
    targeted, predicted = gradcam(rest, **query), gradcam(rest, **parameters)
    expected = [targeted[0], predicted[1]]  # image 0 explained for class 3, image 1 for its predicted class
    heatmaps = np.array([r["heatmap"] for r in expected])
    over_rest = rest_explain(rest, [3, -1], **parameters)
    over_grpc = grpc_explain(triton, [3, -1], **parameters)
    grpc_heatmaps = over_grpc.as_numpy("heatmap")
    assert grpc_heatmaps.dtype == np.float32 and grpc_heatmaps.shape == (2, 32, 32)
    # /gradcam rounds its JSON heatmaps to 4 decimals; the protocol answers the float32 maps themselves.
    np.testing.assert_allclose(grpc_heatmaps, heatmaps, rtol=0, atol=5.1e-5)
    np.testing.assert_allclose(over_rest["heatmap"], grpc_heatmaps, rtol=0, atol=1e-6)
    labels = [r["label"] for r in expected]
    assert [x.decode() for x in over_grpc.as_numpy("label")] == labels == list(over_rest["label"])
    probabilities = [r["probability"] for r in expected]
    np.testing.assert_allclose(over_grpc.as_numpy("probability"), probabilities, rtol=0, atol=1e-6)
    np.testing.assert_allclose(over_rest["probability"], probabilities, rtol=0, atol=1e-6)
    assert over_grpc.as_numpy("road") is None and "road" not in over_rest


def test_road_scores_equal_gradcams(rest, triton):
    expected = [r["road"] for r in gradcam(rest, faithfulness="road", method="xgradcam")]
    over_grpc = grpc_explain(triton, faithfulness="road", method="xgradcam")
    over_rest = rest_explain(rest, faithfulness="road", method="xgradcam")
    np.testing.assert_allclose(over_grpc.as_numpy("road"), expected, rtol=0, atol=5.1e-5)
    np.testing.assert_allclose(over_rest["road"], over_grpc.as_numpy("road"), rtol=0, atol=1e-6)


def test_pixels_binary_outputs_and_the_gradcam_batcher(rest):
    pixels = np.stack([np.asarray(random_image(7 + i)) for i in range(2)]).astype(np.uint8)
    head = {
        "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 32, 32, 3], "data": pixels.ravel().tolist()}],
        "outputs": [{"name": "heatmap", "parameters": {"binary_data": True}}, {"name": "label"}],
    }
    before = rest.get("/metrics").text
    response = rest.post(INFER, json=head)
    assert response.status_code == 200, response.text
    length = int(response.headers["Inference-Header-Content-Length"])
    body = json.loads(response.content[:length])
    assert [o["name"] for o in body["outputs"]] == ["heatmap", "label"]
    heatmaps = np.frombuffer(response.content[length:], "<f4").reshape(2, 32, 32)
    assert np.isfinite(heatmaps).all() and body["outputs"][1]["data"][0] in CLASSES

    def gradcam_images(text: str) -> float:
        found = re.search(r'camserve_images_total\{endpoint="/gradcam"\} (\S+)', text)
        return float(found.group(1)) if found else 0.0

    assert gradcam_images(rest.get("/metrics").text) == gradcam_images(before) + 2


BAD = [
    ({"layer": "head"}, None, None, "unknown layer 'head'"),
    ({"method": "lime"}, None, None, "unknown method 'lime'"),
    ({"faithfulness": "deletion"}, None, None, "unknown faithfulness"),
    ({"colour": "red"}, None, None, r"unknown parameter\(s\) \['colour'\]"),
    ({}, [10, 0], None, "not a class index 0..9"),
    ({}, [1], None, "shape"),
    ({}, None, ["road"], "faithfulness='road'"),
    ({}, None, ["probabilities"], "unknown output"),
]


@pytest.mark.parametrize(("parameters", "targets", "outputs", "message"), BAD)
def test_bad_requests_are_400_and_invalid_argument(rest, triton, parameters, targets, outputs, message):
    inputs = [
        {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(f).decode() for f in FILES]}
    ]
    if targets is not None:
        inputs.append({"name": "target", "datatype": "INT32", "shape": [len(targets)], "data": targets})
    body = {"inputs": inputs, "parameters": parameters}
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    response = rest.post(INFER, json=body)
    assert response.status_code == 400 and re.search(message, response.json()["error"]), response.text
    tensor = grpcclient.InferInput("image", [2], "BYTES")
    tensor.set_data_from_numpy(np.array(FILES, dtype=np.object_))
    grpc_inputs = [tensor]
    if targets is not None:
        target = grpcclient.InferInput("target", [len(targets)], "INT32")
        target.set_data_from_numpy(np.array(targets, dtype=np.int32))
        grpc_inputs.append(target)
    requested = [grpcclient.InferRequestedOutput(name) for name in outputs or ()] or None
    with pytest.raises(InferenceServerException) as caught:
        triton.infer(MODEL, grpc_inputs, outputs=requested, parameters=parameters or None)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert re.search(message, caught.value.message())

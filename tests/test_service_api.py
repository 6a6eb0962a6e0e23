"""The HTTP contract, in process (httpx + ASGITransport, lifespan run by the fixture).

One app serves the module's tests (``app``: its model traced and warmed once); a test that needs other
settings, or that changes the app, makes its own. Every test runs on the module's event loop, the one
the shared app's batchers live on.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import pytest_asyncio
import torch
from harness import metric, parse_metrics, run_camserve
from helpers import CLASSES, animation, encode, grad_cam_by_hand, random_image, served_probabilities
from PIL import Image
from pydantic import SecretStr, ValidationError

from camcore.bundle import load_bundle
from camcore.cam import class_activation_maps
from camcore.forward import ServedForward
from camcore.preprocess import Normalize, image_to_uint8
from service.app import create_app, parallelism
from service.inference.jobs import GradcamJob
from service.inference.torch_engine import TorchEngine
from service.settings import Settings

CORES = len(os.sched_getaffinity(0))

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    # the module's mark reaches its plain functions too, which pytest-asyncio leaves alone with a warning
    pytest.mark.filterwarnings("ignore:.*is marked with '@pytest.mark.asyncio' but it is not an async function"),
]


@pytest.fixture(scope="module")
def settings(bundle_dir: Path) -> Settings:
    # Batches of 4 keep each app's start-up short (its trace and warm-up run at the batch size) and
    # make the larger requests span several batches.
    return Settings(
        model_dir=bundle_dir,
        precision="fp32",
        max_batch_size=4,
        max_files=8,
        max_upload_bytes=2_000_000,
        max_image_pixels=1_000_000,
        max_image_frames=8,
        queue_size=64,
        log_requests=False,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def app(settings: Settings):
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        yield app


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(app) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve") as client:
        yield client


def files(*payloads: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in payloads]


def png(seed: int, **kwargs) -> bytes:
    return encode(random_image(seed, **kwargs))


def single_image_probabilities(app, data: bytes) -> torch.Tensor:
    """Reference, independent of the engine: this one image alone through the bundle's fp32 network,
    eagerly, with the normalisation, softmax and flip average written out (``served_probabilities``)."""
    bundle = app.state.camserve.bundle
    image = image_to_uint8(Image.open(io.BytesIO(data)))
    mean, std = (torch.tensor(bundle.metadata[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    x = (image[None].float() / 255 - mean) / std
    return served_probabilities(bundle.model, x)[0]


# -- health and metadata ---------------------------------------------------------------------------
async def test_health_reports_model_device_and_batching(client, settings):
    body = (await client.get("/health")).json()
    assert body["status"] == "ok" and body["device"] == "cpu" and body["precision"] == "fp32"
    model = body["model"]
    assert model["classes"] == CLASSES and len(model["version"]) == 64
    assert model["architecture"] == "cifar-resnet9" and model["parameters"] > 6_000_000
    assert {"test_accuracy", "val_accuracy", "per_class_accuracy", "trained_epochs", "dataset"} <= set(model)
    assert body["gradcam"]["default_layer"] == "layer2"
    assert [layer["name"] for layer in body["gradcam"]["layers"]] == ["prep", "layer1", "layer2", "layer3"]
    assert body["batching"] == {
        "max_batch_size": settings.max_batch_size,
        "max_wait_ms": settings.max_wait_ms,
        "queue_size": settings.queue_size,
        "model_lanes": min(2, CORES),  # on a CPU: two batches at once, cores/2 threads each
        "torch_threads": CORES // min(2, CORES),
        "traced": True,
    }


def test_parallelism_never_asks_for_more_threads_than_cores():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cores = 2
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
        assert parallelism(Settings(), cpu) == (2, 1)  # two single-threaded lanes
        assert parallelism(Settings(torch_threads=2), cpu) == (1, 2)  # the old one-lane setup
        # One lane on a CPU is given the CPUs counted (affinity and cgroup quota), not torch's default
        # (every physical core of the node, even in a container limited to fewer).
        assert parallelism(Settings(model_lanes=1), cpu) == (1, 2)
        assert parallelism(Settings(), gpu) == (1, None)
        cores = 8
        assert parallelism(Settings(), cpu) == (2, 4)


async def test_live_ready_and_openapi(client):
    assert (await client.get("/livez")).json() == {"status": "alive"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    schema = (await client.get("/openapi.json")).json()
    assert {"/predict", "/gradcam", "/health", "/misclassified"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["files"]["type"] == "array"


async def test_not_ready_before_lifespan(settings):
    app = create_app(settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
        assert (await client.get("/readyz")).status_code == 503
        response = await client.post("/predict", files=files(("a.png", png(0))))
        assert response.status_code == 503 and "not ready" in response.json()["detail"]


# -- /predict ---------------------------------------------------------------------------------------
async def test_predict_returns_top_k_in_order_sent(client, app):
    payloads = [(f"img{i}.png", png(i)) for i in range(5)]
    response = await client.post("/predict?top_k=4", files=files(*payloads))
    assert response.status_code == 200
    body = response.json()
    assert body["model_version"] == app.state.camserve.bundle.version
    assert [p["filename"] for p in body["predictions"]] == [name for name, _ in payloads]
    for (_, data), prediction in zip(payloads, body["predictions"], strict=True):
        top = prediction["top_k"]
        assert len(top) == 4
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert all(CLASSES[t["index"]] == t["label"] for t in top)
        reference = single_image_probabilities(app, data)
        assert reference.sum().item() == pytest.approx(1.0, abs=1e-5)
        for entry in top:
            assert entry["probability"] == pytest.approx(reference[entry["index"]].item(), abs=1e-5)


async def test_predict_top_k_bounds(client):
    for bad in (0, 11, "x"):
        response = await client.post(f"/predict?top_k={bad}", files=files(("a.png", png(0))))
        assert response.status_code == 422
    response = await client.post("/predict?top_k=10", files=files(("a.png", png(0))))
    assert response.status_code == 200
    probabilities = [t["probability"] for t in response.json()["predictions"][0]["top_k"]]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("gray.png", lambda: encode(random_image(1, mode="L"))),
        ("rgba.png", lambda: encode(random_image(2, mode="RGBA"))),
        ("palette.gif", lambda: encode(random_image(3).convert("P"), "GIF")),
        ("big.jpg", lambda: encode(random_image(4, size=(640, 480)), "JPEG", quality=90)),
        ("tiny.bmp", lambda: encode(random_image(5, size=(7, 5)), "BMP")),
        ("photo.webp", lambda: encode(random_image(6, size=(64, 48)), "WEBP")),
        ("cmyk.jpg", lambda: encode(random_image(7).convert("CMYK"), "JPEG")),
        ("deep.png", lambda: encode(Image.fromarray(np.full((16, 16), 40000, dtype=np.uint16)))),
    ],
)
async def test_predict_accepts_every_supported_kind(client, name, make):
    response = await client.post("/predict", files=files((name, make())))
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["filename"] == name


async def test_sixteen_bit_images_are_scaled_not_clipped(app):
    from service.decoding.probe import decode_image

    half = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    decoded = decode_image(encode(half), "deep.png", max_pixels=10_000)
    assert 120 <= int(decoded.float().mean()) <= 135


async def test_exif_orientation_is_honoured():
    from service.decoding.probe import decode_image

    image = Image.new("RGB", (64, 32), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 32))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display: the white half ends on top
    data = encode(image, "JPEG", exif=exif, quality=95)
    decoded = decode_image(data, "rotated.jpg", max_pixels=10_000).float()
    assert decoded[:, :12].mean() > 200 and decoded[:, -12:].mean() < 50


# -- refusals: always 4xx JSON naming the file, and the service keeps serving -------------------------
@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (("notes.txt", b"hello, this is not an image"), 400, "notes.txt: not an image"),
        (("empty.png", b""), 400, "empty.png: empty file"),
        (("cut.png", png(9)[:60]), 400, "cut.png: corrupt"),
        (("scan.tiff", encode(random_image(0), "TIFF")), 415, "scan.tiff: unsupported image type TIFF"),
        (("huge.png", encode(Image.new("L", (2000, 1000)))), 413, "huge.png: 2000x1000 pixels exceeds"),
        (("reel.gif", animation(9)[0]), 413, "reel.gif: too many frames: at most 8 per image"),
        (("reel.webp", animation(9, "WEBP")[0]), 413, "reel.webp: too many frames: at most 8 per image"),
        (("reel.png", animation(9, "PNG")[0]), 413, "reel.png: too many frames: at most 8 per image"),
    ],
)
async def test_bad_uploads_get_clear_4xx(client, payload, status, words):
    response = await client.post("/predict", files=files(payload))
    assert response.status_code == status
    assert words in response.json()["detail"]
    assert (await client.post("/predict", files=files(("ok.png", png(1))))).status_code == 200


async def test_request_level_refusals(client, settings):
    response = await client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]
    response = await client.post("/predict", files=[("other", ("a.png", png(0), "image/png"))])
    assert response.status_code == 422 and "files" in response.json()["detail"]
    many = files(*[(f"{i}.png", png(i)) for i in range(settings.max_files + 1)])
    response = await client.post("/predict", files=many)
    assert response.status_code == 413 and "too many files" in response.json()["detail"]
    big = files(("big.bin", b"\0" * (settings.max_upload_bytes + 10)))
    response = await client.post("/predict", files=big)
    assert response.status_code == 413 and "exceeds" in response.json()["detail"]
    assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
async def test_animation_within_the_frame_cap_is_answered_from_its_first_frame(client, app, settings, fmt):
    data, first = animation(settings.max_image_frames, fmt)
    response = await client.post("/predict?top_k=10", files=files((f"reel.{fmt.lower()}", data)))
    assert response.status_code == 200, response.text
    reference = single_image_probabilities(app, encode(first))
    for entry in response.json()["predictions"][0]["top_k"]:
        assert entry["probability"] == pytest.approx(reference[entry["index"]].item(), abs=1e-5)
    assert (await client.get("/health")).status_code == 200


def test_decode_image_frame_cap():
    from service.decoding.probe import ImageRejected, decode_image

    data, first = animation(5)
    with pytest.raises(ImageRejected) as refused:
        decode_image(data, "reel.gif", max_pixels=10_000, max_frames=4)
    assert refused.value.status_code == 413 and str(refused.value) == "reel.gif: too many frames: at most 4 per image"
    decoded = decode_image(data, "reel.gif", max_pixels=10_000, max_frames=5)
    assert torch.equal(decoded, decode_image(encode(first), "first.png", max_pixels=10_000, max_frames=1))
    still = encode(random_image(0).convert("P"), "GIF")
    assert decode_image(still, "still.gif", max_pixels=10_000, max_frames=1).shape == (3, 32, 32)


def test_gif_frame_count_matches_pillow_and_stops_at_the_limit():
    from service.decoding.probe import decode_image, gif_frames

    for count in (1, 2, 7, 40):
        data, _ = animation(count, seed=count)
        with Image.open(io.BytesIO(data)) as image:
            assert gif_frames(data, 1000) == image.n_frames == count
        assert gif_frames(data, 5) == min(count, 6)
    # Cut off or noise: counts what arrived and never raises (Pillow's n_frames raises IndexError on a
    # GIF cut inside a later frame, whose frame 0 decodes fine)
    data, first = animation(3)
    assert gif_frames(data[:-300], 1000) == 3
    decoded = decode_image(data[:-300], "cut.gif", max_pixels=10_000, max_frames=3)
    assert torch.equal(decoded, decode_image(encode(first), "first.png", max_pixels=10_000))
    assert gif_frames(b"GIF89a" + bytes(range(256)) * 4, 1000) == 0
    assert gif_frames(b"GIF8", 1000) == 0


def test_frame_cap_setting(monkeypatch):
    monkeypatch.setenv("CAMSERVE_MAX_IMAGE_FRAMES", "12")
    assert Settings().max_image_frames == 12
    monkeypatch.setenv("CAMSERVE_MAX_IMAGE_FRAMES", "0")
    with pytest.raises(ValidationError):
        Settings()


# -- batching -----------------------------------------------------------------------------------------
async def test_concurrent_clients_each_get_their_own_answers(client, app):
    rng = np.random.default_rng(0)
    requests = []
    for r in range(24):
        count = int(rng.integers(1, 5))
        requests.append(([(f"r{r}-{i}.png", png(1000 * r + i)) for i in range(count)], int(rng.integers(1, 6))))

    async def call(payloads, k):
        return await client.post(f"/predict?top_k={k}", files=files(*payloads))

    sizes = app.state.camserve.metrics.batch_size.labels("/predict")
    images_before = sizes._sum.get()
    responses = await asyncio.gather(*(call(p, k) for p, k in requests))
    for (payloads, k), response in zip(requests, responses, strict=True):
        assert response.status_code == 200
        predictions = response.json()["predictions"]
        assert [p["filename"] for p in predictions] == [name for name, _ in payloads]
        for (_, data), prediction in zip(payloads, predictions, strict=True):
            reference = single_image_probabilities(app, data)
            assert len(prediction["top_k"]) == k
            assert prediction["top_k"][0]["index"] == int(reference.argmax())
            for entry in prediction["top_k"]:
                assert entry["probability"] == pytest.approx(reference[entry["index"]].item(), abs=1e-4)
    assert sizes._sum.get() - images_before == sum(len(p) for p, _ in requests)  # every image ran exactly once


async def test_full_queue_answers_503_with_retry_after(settings, bundle_dir):
    tight = settings.model_copy(update={"queue_size": 3})
    app = create_app(tight)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        response = await client.post("/predict", files=files(*[(f"{i}.png", png(i)) for i in range(4)]))
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(tight.retry_after_s)
        assert "queue is full" in response.json()["detail"]
        assert (await client.post("/predict", files=files(("a.png", png(0))))).status_code == 200


async def test_a_failing_batch_fails_only_its_requests(client, app):
    engine_batcher = app.state.camserve.predict_batcher
    original = engine_batcher._run_batch
    calls = {"n": 0}

    def flaky(images):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device fault")
        return original(images)

    engine_batcher._run_batch = flaky
    try:
        failed = await client.post("/predict", files=files(("a.png", png(0))))
        assert failed.status_code == 500
        assert "simulated device fault" in failed.json()["detail"]
        ok = await client.post("/predict", files=files(("b.png", png(1))))
        assert ok.status_code == 200
    finally:
        engine_batcher._run_batch = original


# -- /gradcam -----------------------------------------------------------------------------------------
async def test_gradcam_json_contract(client):
    response = await client.post("/gradcam?opacity=0.7", files=files(("a.png", png(0)), ("b.png", png(1))))
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["a.png", "b.png"]
    for result in results:
        heatmap = np.array(result["heatmap"])
        assert heatmap.shape == (32, 32) and heatmap.min() >= 0 and heatmap.max() <= 1
        assert result["layer"] == "layer2" and result["target"] == result["label"]
        overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay_png"])))
        assert overlay.size == (32, 32) and overlay.mode == "RGB"


async def test_gradcam_target_layer_and_png(client):
    by_label = (await client.post("/gradcam?target=cat&layer=layer3", files=files(("a.png", png(0))))).json()
    by_index = (await client.post("/gradcam?target=3&layer=layer3", files=files(("a.png", png(0))))).json()
    assert by_label["results"][0]["target"] == "cat" == by_index["results"][0]["target"]
    assert by_label["results"][0]["heatmap"] == by_index["results"][0]["heatmap"]
    response = await client.post("/gradcam?format=png", files=files(("a.png", png(0))))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (32, 32)


async def test_gradcam_opacity_changes_the_overlay(client):
    clear = (await client.post("/gradcam?opacity=0", files=files(("a.png", png(0))))).json()["results"][0]
    full = (await client.post("/gradcam?opacity=1", files=files(("a.png", png(0))))).json()["results"][0]
    original = np.asarray(random_image(0))
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(clear["overlay_png"]))))
    assert np.array_equal(shown, original)
    assert clear["overlay_png"] != full["overlay_png"]


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("layer=layer9", "valid layers: ['prep', 'layer1', 'layer2', 'layer3']"),
        ("target=giraffe", "unknown target 'giraffe'"),
        ("target=10", "out of range"),
        ("opacity=1.5", "less than or equal to 1"),
        ("format=gif", "'json' or 'png'"),
    ],
)
async def test_gradcam_bad_parameters_are_422(client, query, words):
    response = await client.post(f"/gradcam?{query}", files=files(("a.png", png(0))))
    assert response.status_code == 422
    assert words in str(response.json()["detail"])


async def test_gradcam_png_needs_exactly_one_file(client):
    response = await client.post("/gradcam?format=png", files=files(("a.png", png(0)), ("b.png", png(1))))
    assert response.status_code == 422


async def test_predict_runs_one_traced_call_with_eager_modes_numbers(app):
    """/predict's forward is a TorchScript trace (GIL released for the whole pass): same numbers as eager."""
    engine = app.state.camserve.engine
    assert engine.traced is not None
    generator = torch.Generator().manual_seed(0)
    for size in (1, 5, 8):
        images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(size)]
        with torch.inference_mode():
            eager = engine.forward(torch.stack(images))
        assert torch.equal(torch.from_numpy(np.stack(engine.predict(images))), eager)


def test_bf16_weights_cast_once_give_autocasts_numbers_bit_for_bit(bundle_dir: Path):
    """The engine stores conv/linear weights in bf16 instead of autocast casting them every call."""
    bundle = load_bundle(bundle_dir)
    engine = TorchEngine(bundle, torch.device("cpu"), "bf16", batch_size=4, trace=True, tta="flip")
    assert {p.dtype for p in engine.forward.model.parameters()} == {torch.bfloat16, torch.float32}
    assert {p.dtype for p in bundle.model.parameters()} == {torch.float32}  # the bundle's copy is left alone
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(5)]
    batch = torch.stack(images)
    # Autocast alone, on the fp32 weights, written out here: it casts the weights on every call.
    x = Normalize(bundle.metadata["mean"], bundle.metadata["std"])(batch)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        both = bundle.model(torch.cat([x, x.flip(3)])).float()
    original, mirrored = both.softmax(1).chunk(2)
    assert torch.equal(torch.from_numpy(np.stack(engine.predict(images))), (original + mirrored) / 2)
    rows = engine.gradcam([GradcamJob(image, "layer2", None) for image in images])
    autocast_only = ServedForward.from_bundle(bundle, precision="bf16", tta="flip")
    autocast_only.model = bundle.model  # the fp32 weights, cast by autocast on every call
    reference = class_activation_maps(autocast_only, batch, "layer2", [None] * len(images))
    assert torch.equal(torch.stack([row.heatmap for row in rows]), reference.heatmaps)


async def test_flip_tta_is_the_default_and_health_reports_what_is_served(client, app, bundle_dir):
    body = (await client.get("/health")).json()
    assert body["test_time_augmentation"] == "flip"
    assert body["model"]["served_test_accuracy"] == body["model"]["test_accuracy_flip_tta"] == 0.125
    bundle = app.state.camserve.bundle
    images = [image_to_uint8(random_image(seed)) for seed in range(6)]
    x = Normalize(bundle.metadata["mean"], bundle.metadata["std"])(torch.stack(images))
    served = torch.from_numpy(np.stack(app.state.camserve.engine.predict(images)))
    error = (served - served_probabilities(bundle.model, x)).abs().max()
    # The untrained test net is nearly uniform, so compare with the plain network's gap, not a fixed one.
    assert error < 1e-5 and (served - served_probabilities(bundle.model, x, tta="none")).abs().max() > 10 * error
    mirrored = torch.from_numpy(np.stack(app.state.camserve.engine.predict([image.flip(2) for image in images])))
    assert torch.allclose(mirrored, served, atol=1e-5)  # an image and its mirror: the same two views


async def test_tta_none_serves_the_plain_network(settings):
    app = create_app(settings.model_copy(update={"tta": "none"}))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve") as client:
            body = (await client.get("/health")).json()
            assert body["test_time_augmentation"] == "none"
            assert body["model"]["served_test_accuracy"] == body["model"]["test_accuracy"] == 0.1
            data = png(3)
            response = await client.post("/predict?top_k=10", files=files(("a.png", data)))
        bundle = app.state.camserve.bundle
        image = image_to_uint8(Image.open(io.BytesIO(data)))
        x = Normalize(bundle.metadata["mean"], bundle.metadata["std"])(image[None])
        served = torch.zeros(10)
        for entry in response.json()["predictions"][0]["top_k"]:
            served[entry["index"]] = entry["probability"]
        assert torch.allclose(served, served_probabilities(bundle.model, x, tta="none")[0], atol=1e-5)


async def test_gradcam_under_flip_tta_reports_predicts_probabilities_and_the_plain_heatmap(client, app):
    data = png(11)
    image = image_to_uint8(Image.open(io.BytesIO(data)))
    bundle = app.state.camserve.bundle
    probabilities = single_image_probabilities(app, data)  # flip TTA, as /predict answers
    target = int(probabilities.argmax())
    response = await client.post("/gradcam?layer=layer2", files=files(("a.png", data)))
    result = response.json()["results"][0]
    assert result["target_index"] == target  # the default target: the TTA prediction, as /predict gives it
    assert result["probability"] == pytest.approx(float(probabilities[target]), abs=1e-5)
    mean, std = (torch.tensor(bundle.metadata[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    plain = grad_cam_by_hand(bundle.model, (image[None].float() / 255 - mean) / std, "layer2", target)  # no TTA
    assert np.allclose(np.asarray(result["heatmap"]), plain.numpy(), atol=2e-4)  # 4 decimals served


async def test_model_weights_never_store_gradients(client, app):
    await client.post("/gradcam", files=files(("a.png", png(0))))
    model = app.state.camserve.engine.forward.model
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


# -- misclassified, metrics, auth ------------------------------------------------------------------
async def test_misclassified_gallery(client):
    body = (await client.get("/misclassified?n=3")).json()
    assert body["total"] == 6 and len(body["items"]) == 3
    item = body["items"][0]
    assert {"true_label", "predicted_label", "confidence", "image_png"} <= set(item)
    assert Image.open(io.BytesIO(base64.b64decode(item["image_png"]))).size == (32, 32)
    assert (await client.get("/misclassified?n=7")).status_code == 422
    assert (await client.get("/misclassified?n=0")).status_code == 422


async def test_metrics_and_request_ids(client):
    before = parse_metrics((await client.get("/metrics")).text)
    response = await client.post("/predict", files=files(("a.png", png(0))), headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = [(await client.get("/livez")).headers["x-request-id"] for _ in range(2)]
    assert generated[0] != generated[1] and all(re.fullmatch("[0-9a-f]{32}", i) for i in generated), generated
    await client.post("/predict", files=files(("bad.txt", b"nope")))
    text = (await client.get("/metrics")).text
    after = parse_metrics(text)

    def counted(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert counted("camserve_requests_total", endpoint="/predict", method="POST", status="200") == 1
    assert counted("camserve_requests_total", endpoint="/predict", method="POST", status="400") == 1
    assert counted("camserve_rejections_total", reason="image_400") == 1
    assert counted("camserve_batch_size_count", endpoint="/predict") == 1  # the bad file never reached a batch
    assert "camserve_queue_depth" in text and "camserve_model_info" in text


async def test_api_key_protects_the_api_but_not_the_probes(settings):
    secured = settings.model_copy(update={"api_key": SecretStr("s3cret")})
    app = create_app(secured)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        upload = files(("a.png", png(0)))
        assert (await client.post("/predict", files=upload)).status_code == 401
        assert (await client.post("/predict", files=upload, headers={"X-API-Key": "wrong"})).status_code == 401
        ok = await client.post("/predict", files=upload, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert (await client.post("/predict", files=upload, headers={"X-API-Key": "s3cret"})).status_code == 200
        for path in ("/health", "/livez", "/readyz"):
            assert (await client.get(path)).status_code == 200


async def test_openapi_declares_the_key_so_docs_can_send_it(client):
    schema = (await client.get("/openapi.json")).json()
    schemes = schema["components"]["securitySchemes"]
    header = schemes["APIKeyHeader"]
    assert (header["type"], header["in"], header["name"]) == ("apiKey", "header", "X-API-Key")
    assert schemes["HTTPBearer"]["type"] == "http" and schemes["HTTPBearer"]["scheme"] == "bearer"
    for path, method in (("/predict", "post"), ("/gradcam", "post"), ("/misclassified", "get")):
        assert {name for entry in schema["paths"][path][method]["security"] for name in entry} == set(schemes)
    for path in ("/health", "/livez", "/readyz", "/metrics"):
        assert "security" not in schema["paths"][path]["get"]


async def test_api_key_is_compared_as_utf8_bytes(settings):
    key = "clé-ключ-鍵"
    app = create_app(settings.model_copy(update={"api_key": SecretStr(key)}))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client,
    ):
        upload = files(("a.png", png(0)))

        async def status(headers: dict[str, bytes]) -> int:
            return (await client.post("/predict", files=upload, headers=headers)).status_code

        # Raw header bytes, as a client sends them: the key's UTF-8 encoding is accepted...
        assert await status({"X-API-Key": key.encode("utf-8")}) == 200
        assert await status({"Authorization": b"Bearer " + key.encode("utf-8")}) == 200
        # ...and neither another encoding of the same text nor a prefix of its bytes is.
        assert await status({"X-API-Key": "clé".encode("latin-1")}) == 401
        assert await status({"X-API-Key": key.encode("utf-8")[:-1]}) == 401
        assert await status({"Authorization": b"Basic " + key.encode("utf-8")}) == 401


@pytest.mark.parametrize("blank", ["", "   ", "\t"])
def test_a_blank_api_key_is_refused_at_start_up(monkeypatch, blank):
    monkeypatch.setenv("CAMSERVE_API_KEY", blank)
    with pytest.raises(ValidationError, match="CAMSERVE_API_KEY is set but empty"):
        Settings()
    monkeypatch.setenv("CAMSERVE_API_KEY", " padded ")
    with pytest.raises(ValidationError, match="starts or ends with whitespace"):
        Settings()


@pytest.mark.server
def test_python_m_service_exits_2_naming_a_blank_api_key(bundle_dir: Path):
    done = run_camserve(bundle_dir, api_key="  ")
    assert done.returncode == 2
    assert "camserve: cannot start: CAMSERVE_API_KEY is set but empty" in done.stderr


async def test_an_app_started_again_after_a_stop_is_ready_again(settings):
    app = create_app(settings)
    for _ in range(2):
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://camserve") as client:
                assert (await client.get("/readyz")).status_code == 200
                assert (await client.post("/predict", files=files(("a.png", png(1))))).status_code == 200
        assert app.state.camserve.draining

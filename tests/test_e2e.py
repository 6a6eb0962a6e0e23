"""End to end against a real uvicorn process: concurrency, served accuracy, graceful shutdown."""

from __future__ import annotations

import asyncio
import io
import signal
from pathlib import Path

import httpx
import pytest
import torch
from conftest import SHIPPED_BUNDLE, shared_cifar_archive
from harness import camserve
from helpers import encode, random_image, real_test_slice, served_probabilities
from PIL import Image

from camcore.bundle import load_bundle
from camcore.preprocess import Normalize, image_to_uint8

pytestmark = pytest.mark.server


def _model_dir(bundle_dir: Path) -> Path:
    return SHIPPED_BUNDLE if (SHIPPED_BUNDLE / "model.json").is_file() else bundle_dir


@pytest.fixture(scope="module")
def server(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with camserve(_model_dir(bundle_dir), log, precision="fp32", log_requests="false") as server:
        yield server.base_url, server.process


def _reference_probabilities(model_dir: Path, payloads: list[bytes]) -> torch.Tensor:
    bundle = load_bundle(model_dir)
    images = torch.stack([image_to_uint8(Image.open(io.BytesIO(p))) for p in payloads])
    x = Normalize(bundle.metadata["mean"], bundle.metadata["std"])(images)
    return served_probabilities(bundle.model, x, temperature=bundle.temperature)


def test_concurrent_clients_over_real_http(server, bundle_dir):
    base, _ = server
    payloads = [encode(random_image(500 + i)) for i in range(48)]
    reference = _reference_probabilities(_model_dir(bundle_dir), payloads)

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

            async def one(start: int, count: int):
                files = [("files", (f"{start + j}.png", payloads[start + j])) for j in range(count)]
                return start, count, await client.post("/predict?top_k=10", files=files)

            chunks = [(i, 1 + i % 3) for i in range(0, 48, 3)] + [(i, 1) for i in range(48)]
            return await asyncio.gather(*(one(s, min(c, 48 - s)) for s, c in chunks))

    for start, count, response in asyncio.run(run()):
        assert response.status_code == 200
        predictions = response.json()["predictions"]
        assert [p["filename"] for p in predictions] == [f"{start + j}.png" for j in range(count)]
        for j, prediction in enumerate(predictions):
            served = torch.zeros(10)
            for entry in prediction["top_k"]:
                served[entry["index"]] = entry["probability"]
            assert torch.allclose(served, reference[start + j], atol=1e-4)


def test_served_predictions_reproduce_the_bundle_on_real_test_images(server, bundle_dir):
    archive = shared_cifar_archive()
    if archive is None:
        pytest.skip("the CIFAR-10 archive is not on this machine")
    base, _ = server
    model_dir = _model_dir(bundle_dir)
    rows = real_test_slice(archive, per_class=20)
    reference = _reference_probabilities(model_dir, [data for _, data, _ in rows]).argmax(1)
    classes = load_bundle(model_dir).classes
    served = []
    for start in range(0, len(rows), 25):
        chunk = rows[start : start + 25]
        response = httpx.post(f"{base}/predict?top_k=1", files=[("files", (n, d)) for n, d, _ in chunk], timeout=60)
        assert response.status_code == 200
        served += [p["top_k"][0]["index"] for p in response.json()["predictions"]]
    assert served == reference.tolist()
    truth = torch.tensor([classes.index(label) for _, _, label in rows])
    served_accuracy = float((torch.tensor(served) == truth).float().mean())
    assert served_accuracy == pytest.approx(float((reference == truth).float().mean()))
    if model_dir == SHIPPED_BUNDLE:  # a trained model: the slice's accuracy is near what the bundle claims
        claimed = load_bundle(model_dir).metadata["test_accuracy_flip_tta"]  # the server's default TTA
        assert abs(served_accuracy - claimed) < 0.06


def test_sigterm_finishes_accepted_requests_then_exits_cleanly(bundle_dir, tmp_path):
    payload = encode(random_image(7))
    log = tmp_path / "server.log"
    with camserve(_model_dir(bundle_dir), log, log_requests="true") as server:
        base, process = server.base_url, server.process

        async def load_then_stop():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                files = [("files", (f"{i}.png", payload)) for i in range(8)]
                tasks = [asyncio.create_task(client.post("/predict", files=files)) for _ in range(24)]
                await asyncio.sleep(0.3)  # requests are in flight
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(load_then_stop())
        assert process.wait(timeout=60) == 0
    answered = [r for r in results if isinstance(r, httpx.Response)]
    assert answered, "no request was accepted before the signal"
    assert all(r.status_code == 200 and len(r.json()["predictions"]) == 8 for r in answered), [
        r.status_code for r in answered
    ]
    refused = [r for r in results if not isinstance(r, httpx.Response)]
    assert all(isinstance(r, httpx.TransportError) for r in refused)  # never accepted, never half-answered
    assert "stopped" in log.read_text()

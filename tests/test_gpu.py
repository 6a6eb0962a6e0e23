"""On a CUDA machine: the service puts the bundle on the GPU and serves what the CPU serves.

CI has no GPU, so these skip there; on a GPU machine run ``pytest tests/test_gpu.py`` (with
``CAMSERVE_CIFAR_ARCHIVE`` pointing at the CIFAR-10 archive for the real-image checks).
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import torch
from conftest import SHIPPED_BUNDLE, shared_cifar_archive
from helpers import real_test_slice, served_probabilities
from PIL import Image

from camcore.bundle import load_bundle
from camcore.cam import class_activation_maps
from camcore.forward import ServedForward
from camcore.preprocess import Normalize, image_to_uint8
from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def real_images() -> list[tuple[str, bytes, str]]:
    archive = shared_cifar_archive()
    if archive is None:
        pytest.skip("the CIFAR-10 archive is not on this machine")
    return real_test_slice(archive, per_class=50)


@pytest.fixture(scope="module")
def cpu_reference(real_images):
    """The shipped bundle on the CPU in fp32: inputs, the probabilities served by default (flip TTA), the model."""
    bundle = load_bundle(SHIPPED_BUNDLE)
    images = torch.stack([image_to_uint8(Image.open(io.BytesIO(data))) for _, data, _ in real_images])
    x = Normalize(bundle.metadata["mean"], bundle.metadata["std"])(images)
    return bundle, images, served_probabilities(bundle.model, x, temperature=bundle.temperature)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=SHIPPED_BUNDLE, device="auto", precision="auto", log_requests=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve", timeout=60) as client:
            yield client


def _files(rows: list[tuple[str, bytes, str]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "image/jpeg")) for name, data, _ in rows]


async def test_health_reports_the_gpu_and_the_precision_it_chose(client):
    body = (await client.get("/health")).json()
    assert body["status"] == "ok"
    assert body["device"].startswith("cuda")
    assert body["precision"] in {"fp32", "fp16", "bf16"}


async def test_gpu_predictions_agree_with_the_cpu_on_real_test_images(client, real_images, cpu_reference):
    bundle, _, cpu_probabilities = cpu_reference
    served = []
    for start in range(0, len(real_images), 32):
        response = await client.post("/predict?top_k=1", files=_files(real_images[start : start + 32]))
        assert response.status_code == 200, response.text
        served += [p["top_k"][0]["index"] for p in response.json()["predictions"]]
    served_t = torch.tensor(served)
    agreement = float((served_t == cpu_probabilities.argmax(1)).float().mean())
    assert agreement >= 0.99, agreement  # low precision on the GPU may flip a near tie, not more
    truth = torch.tensor([bundle.classes.index(label) for _, _, label in real_images])
    gpu_accuracy = float((served_t == truth).float().mean())
    cpu_accuracy = float((cpu_probabilities.argmax(1) == truth).float().mean())
    assert abs(gpu_accuracy - cpu_accuracy) <= 0.01


async def test_gpu_gradcam_matches_the_cpu_heatmaps(client, real_images, cpu_reference):
    bundle, images, _ = cpu_reference
    rows = real_images[::50][:10]  # one image of each class
    indices = list(range(0, len(real_images), 50))[:10]
    response = await client.post("/gradcam?layer=layer2", files=_files(rows))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    served_recipe = ServedForward.from_bundle(bundle, tta="flip")  # default target from TTA, as served
    reference = class_activation_maps(served_recipe, images[indices], "layer2", [None] * len(indices))
    for result, expected in zip(results, reference.heatmaps, strict=True):
        served = np.asarray(result["heatmap"], dtype=np.float64).ravel()
        pearson = np.corrcoef(served, expected.double().numpy().ravel())[0, 1]
        assert pearson >= 0.98, (result["filename"], pearson)

"""One image as the raw request body (``Content-Type: image/...``), beside multipart, in process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from helpers import encode, random_image

from service.app import create_app
from service.settings import Settings


@pytest.fixture(scope="module")
def settings(bundle_dir: Path) -> Settings:
    return Settings(
        model_dir=bundle_dir, precision="fp32", max_batch_size=4, max_upload_bytes=200_000, log_requests=False
    )


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve") as client:
            yield client


def multipart(name: str, data: bytes) -> dict:
    return {"files": [("files", (name, data, "application/octet-stream"))]}


@pytest.mark.parametrize("fmt,media", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp")])
async def test_raw_body_answers_as_multipart_does(client, fmt: str, media: str) -> None:
    data = encode(random_image(7, size=(48, 40)), fmt)
    as_form = (await client.post("/predict?top_k=5", **multipart("image", data))).json()
    raw = await client.post("/predict?top_k=5", content=data, headers={"content-type": media})
    assert raw.status_code == 200
    assert raw.json() == as_form  # same decoding, same filename ("image" by default), same answer

    form_cam = (await client.post("/gradcam", **multipart("image", data))).json()
    raw_cam = (await client.post("/gradcam", content=data, headers={"content-type": media})).json()
    assert raw_cam == form_cam


async def test_raw_body_takes_its_name_from_content_disposition(client) -> None:
    data = encode(random_image(3))
    headers = {"content-type": "image/png", "content-disposition": 'inline; filename="cat.png"'}
    answer = (await client.post("/predict", content=data, headers=headers)).json()
    assert answer["predictions"][0]["filename"] == "cat.png"
    png = await client.post("/gradcam?format=png", content=data, headers=headers)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


async def test_bad_raw_bodies_get_clear_4xx(client) -> None:
    empty = await client.post("/predict", content=b"", headers={"content-type": "image/png"})
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    text = await client.post("/predict", content=b"not an image at all", headers={"content-type": "image/jpeg"})
    assert text.status_code == 400 and text.json()["detail"].startswith("image: not an image")
    tiff = encode(random_image(1), "TIFF")
    unsupported = await client.post("/predict", content=tiff, headers={"content-type": "image/tiff"})
    assert unsupported.status_code == 415
    big = await client.post("/predict", content=b"\0" * 300_000, headers={"content-type": "image/png"})
    assert big.status_code == 413
    # Neither multipart nor an image: refused as before.
    other = await client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    assert other.status_code == 415
    assert (await client.get("/readyz")).status_code == 200


async def test_openapi_documents_both_bodies(client) -> None:
    schema = (await client.get("/openapi.json")).json()
    content = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in content and "image/jpeg" in content and "image/png" in content

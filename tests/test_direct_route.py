"""``POST /predict``'s direct route (service/http/front.py, service/api/predict.py): taken only for requests
it can serve as sent, answering byte for byte as the FastAPI route does; everything else, and every
refusal, comes from the FastAPI route as before. In process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from harness import metric, multipart_body, parse_metrics
from helpers import encode, random_image

from service.api.predict import DirectPredict
from service.app import create_app
from service.settings import Settings

KEY = "s3cret-key"


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths+queries the direct route served."""
    served: list[str] = []
    original = DirectPredict.__call__

    async def spy(self, scope, receive, send, headers):  # type: ignore[no-untyped-def]
        served.append(scope["path"] + "?" + scope["query_string"].decode())
        await original(self, scope, receive, send, headers)

    monkeypatch.setattr(DirectPredict, "__call__", spy)
    return served


async def started(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


def settings_for(bundle_dir: Path, **extra) -> Settings:
    return Settings(model_dir=bundle_dir, precision="fp32", max_upload_bytes=200_000, max_files=4, **extra)


@pytest.fixture
async def client(bundle_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in started(settings_for(bundle_dir)):
        yield client


@pytest.fixture
async def keyed(bundle_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async for client in started(settings_for(bundle_dir, api_key=KEY)):
        yield client


def form(*images: bytes) -> dict:
    body = multipart_body([(f"{i}.png", data) for i, data in enumerate(images)])
    return {"content": body.data, "headers": {"content-type": body.content_type}}


def raw(data: bytes, **headers: str) -> dict:
    return {"content": data, "headers": {"content-type": "image/png", **headers}}


def same_answer(direct: httpx.Response, route: httpx.Response) -> None:
    assert direct.status_code == route.status_code == 200
    assert direct.content == route.content  # the same bytes: one answer builder, Starlette's JSON rendering
    drop = {"x-request-id"}
    assert {k: v for k, v in direct.headers.items() if k not in drop} == {
        k: v for k, v in route.headers.items() if k not in drop
    }
    assert direct.headers["x-request-id"] and direct.headers["x-request-id"] != route.headers["x-request-id"]


async def test_common_requests_are_direct_and_answer_as_the_route(client, taken) -> None:
    images = [encode(random_image(seed)) for seed in range(3)]
    cases = [
        ("", raw(images[0])),
        ("", raw(images[0], **{"content-disposition": 'inline; filename="cat.png"'})),
        ("top_k=5", form(images[0])),
        ("top_k=10", form(*images)),
    ]
    for query, request in cases:
        direct = await client.post(f"/predict?{query}", **request)
        # An extra parameter is not the direct route's to judge: the FastAPI route serves it (and ignores it).
        route = await client.post(f"/predict?{query}&via=route" if query else "/predict?via=route", **request)
        same_answer(direct, route)
    assert taken == [f"/predict?{query}" for query, _ in cases]
    samples = parse_metrics((await client.get("/metrics")).text)
    assert metric(samples, "camserve_requests_total", endpoint="/predict", method="POST", status="200") == 8


async def test_refusals_come_from_the_fastapi_route(client, taken) -> None:
    image = encode(random_image(1))
    for query in ("top_k=0", "top_k=11", "top_k=abc", "top_k=", "top_k=3&top_k=4"):
        answer = await client.post(f"/predict?{query}", **raw(image))
        if query == "top_k=3&top_k=4":  # FastAPI reads the last one: served, by the route
            assert answer.status_code == 200 and len(answer.json()["predictions"][0]["top_k"]) == 4
        else:
            assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "top_k"]
    other = await client.post("/predict", content=b"{}", headers={"content-type": "application/json"})
    assert other.status_code == 415 and "multipart/form-data" in other.json()["detail"]

    state = client.app.state.camserve
    state.ready = False
    not_ready = await client.post("/predict", **raw(image))
    assert not_ready.status_code == 503 and not_ready.headers["retry-after"] == str(state.settings.retry_after_s)
    state.ready = True
    batcher = state.batchers["predict"]
    batcher.queue_size, size = 0, batcher.queue_size
    full = await client.post("/predict", **raw(image))
    batcher.queue_size = size
    assert full.status_code == 503 and "queue is full" in full.json()["detail"]
    assert taken == []
    samples = parse_metrics((await client.get("/metrics")).text)
    assert metric(samples, "camserve_rejections_total", reason="queue_full") == 1  # counted once, by the route


async def test_the_key_is_checked_the_same_way(keyed, taken) -> None:
    image = encode(random_image(2))
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": f"Basic {KEY}"}):
        refused = await keyed.post("/predict", **raw(image, **headers))
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert taken == []
    for headers in ({"x-api-key": KEY}, {"authorization": f"Bearer {KEY}"}, {"authorization": f"bearer  {KEY} "}):
        assert (await keyed.post("/predict", **raw(image, **headers))).status_code == 200
    assert len(taken) == 3
    samples = parse_metrics((await keyed.get("/metrics")).text)
    assert metric(samples, "camserve_rejections_total", reason="unauthorized") == 3


async def test_errors_inside_the_direct_route_take_the_one_error_path(client, taken) -> None:
    cases = [
        raw(b"not an image at all"),
        raw(b""),
        form(*[encode(random_image(i)) for i in range(5)]),  # max_files is 4
        {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
    ]
    for request in cases:
        direct = await client.post("/predict", **request)
        route = await client.post("/predict?via=route", **request)
        assert 400 <= direct.status_code < 500 and direct.status_code == route.status_code
        assert direct.json() == route.json()
        assert direct.headers["x-content-type-options"] == "nosniff"
    assert len(taken) == len(cases)

    async def stream():  # chunked, no Content-Length: the front counts it as it arrives
        for _ in range(30):
            yield b"\0" * 10_000

    too_big = await client.post("/predict", content=stream(), headers={"content-type": "image/png"})
    assert too_big.status_code == 413 and too_big.headers["connection"] == "close"
    samples = parse_metrics((await client.get("/metrics")).text)
    assert metric(samples, "camserve_rejections_total", reason="body_too_large") == 1
    assert metric(samples, "camserve_rejections_total", reason="image_400") == 4  # twice each, once per door
    assert (await client.get("/readyz")).status_code == 200


async def test_cors_keeps_every_request_on_the_routes(bundle_dir: Path, taken) -> None:
    async for client in started(settings_for(bundle_dir, cors_origins=["https://app.example"])):
        answer = await client.post("/predict", **raw(encode(random_image(3)), origin="https://app.example"))
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "https://app.example"
    assert taken == []


async def test_an_unexpected_error_is_a_500_with_the_request_id_either_way(bundle_dir: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("service.api.predict.answer", broken)
    app = create_app(settings_for(bundle_dir))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # the route's error is re-raised
        async with httpx.AsyncClient(transport=transport, base_url="http://camserve") as client:
            image = encode(random_image(4))
            for path in ("/predict", "/predict?via=route"):
                answer = await client.post(path, **raw(image))
                request_id = answer.headers["x-request-id"]
                assert answer.status_code == 500 and answer.headers["x-content-type-options"] == "nosniff"
                assert answer.json() == {"detail": f"internal error (RuntimeError); request id {request_id}"}
            assert (await client.get("/readyz")).status_code == 200

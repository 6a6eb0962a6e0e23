"""Hot reload: a new bundle swapped in under load without a failed request; a bad one refused."""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import re
import shutil
import signal
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from harness import camserve, wait_until, wait_until_async
from helpers import encode, make_bundle, point, random_image

from camcore.bundle import METADATA_FILE, WEIGHTS_FILE
from service.app import create_app
from service.inference.contract import run_predict
from service.inference.registry import Pinned, pinned_batch
from service.settings import Settings

MODEL = "test-bundle"
PNG = encode(random_image(5))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two valid bundles with different weights, and a copy of the second with its weights corrupted."""
    root = tmp_path_factory.mktemp("reload")
    first = make_bundle(root / "a" / MODEL, seed=0)
    second = make_bundle(root / "b" / MODEL, seed=1)
    corrupt = root / "corrupt" / MODEL
    shutil.copytree(second, corrupt)
    weights = bytearray((corrupt / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (corrupt / WEIGHTS_FILE).write_bytes(bytes(weights))
    return SimpleNamespace(first=first, second=second, corrupt=corrupt)


@pytest.fixture
async def served(bundles: SimpleNamespace, tmp_path: Path):
    link = tmp_path / "current"
    point(link, bundles.first)
    settings = Settings(
        model_dir=link, precision="fp32", max_batch_size=4, queue_size=256, log_requests=False, model_control=True
    )
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve", timeout=60) as client,
    ):
        yield SimpleNamespace(app=app, client=client, link=link)


def version_at(base: str) -> str:
    return httpx.get(f"{base}/health", timeout=10).json()["model"]["version"]


async def version_of(client: httpx.AsyncClient) -> str:
    return (await client.get("/health")).json()["model"]["version"]


async def test_reload_under_load_fails_no_request_and_versions_name_the_weights(served, bundles):
    client = served.client
    first = await version_of(client)
    answers: list[tuple[float, float, int, str, tuple[float, ...]]] = []  # started, ended, status, version, probs
    stop = asyncio.Event()

    async def stream(kind: str) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            if kind == "predict":
                response = await client.post("/predict", params={"top_k": 10}, files=[("files", ("a.png", PNG))])
                body = response.json()
                top = body.get("predictions", [{}])[0].get("top_k", [])
                probabilities = tuple(p["probability"] for p in sorted(top, key=lambda e: e["index"]))
            else:
                inputs = [
                    {"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(PNG).decode()]}
                ]
                response = await client.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs})
                body = response.json()
                probabilities = tuple(body.get("outputs", [{}])[0].get("data", []))
            answers.append(
                (started, time.perf_counter(), response.status_code, body.get("model_version"), probabilities)
            )

    workers = [asyncio.create_task(stream("predict" if i % 2 else "oip")) for i in range(6)]
    try:
        await wait_until_async(lambda: sum(a[3] == first for a in answers) >= 20, 120, what="20 answers before")
        point(served.link, bundles.second)
        load_sent = time.perf_counter()
        loaded = await client.post(f"/v2/repository/models/{MODEL}/load")
        load_done = time.perf_counter()
        assert loaded.status_code == 200, loaded.text
        second = loaded.json()["version"]
        assert second != first and loaded.json()["previous_version"] == first
        await wait_until_async(lambda: sum(a[0] > load_done for a in answers) >= 20, 120, what="20 answers after")
    finally:
        stop.set()  # the streams end whatever happened above
        await asyncio.gather(*workers)

    assert [a for a in answers if a[2] != 200] == []  # not one request failed
    versions = {a[3] for a in answers}
    assert versions == {first, second}
    assert all(a[3] == first for a in answers if a[1] < load_sent)  # answered before the reload began
    assert all(a[3] == second for a in answers if a[0] > load_done)  # asked after it finished
    assert sum(load_sent < a[1] and a[0] < load_done for a in answers) > 0  # some were in flight meanwhile
    # Every answer's probabilities are those of the weights its model_version names.
    for version in (first, second):
        rows = np.array([a[4] for a in answers if a[3] == version])
        np.testing.assert_allclose(rows, np.broadcast_to(rows[0], rows.shape), rtol=0, atol=1e-6)
    by_version = {a[3]: np.array(a[4]) for a in answers}
    assert np.abs(by_version[first] - by_version[second]).max() > 1e-3
    assert await version_of(client) == second
    index = (await client.post("/v2/repository/index")).json()
    assert index == [
        {"name": name, "version": second, "state": "READY", "reason": ""} for name in (MODEL, f"{MODEL}-cam")
    ]


async def test_a_corrupt_bundle_is_refused_and_the_old_one_keeps_serving(served, bundles, tmp_path):
    client = served.client
    first = await version_of(client)
    point(served.link, bundles.corrupt)
    refused = await client.post(f"/v2/repository/models/{MODEL}/load")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert "sha256" in error and f"still serving {first}" in error
    not_a_bundle = tmp_path / "empty"
    not_a_bundle.mkdir()
    point(served.link, not_a_bundle)
    refused = await client.post(f"/v2/repository/models/{MODEL}/load")
    assert refused.status_code == 400 and "model.json: missing" in refused.json()["error"]
    assert await version_of(client) == first
    answer = await client.post("/predict", files=[("files", ("a.png", PNG))])
    assert answer.status_code == 200 and answer.json()["model_version"] == first
    unknown = await client.post("/v2/repository/models/resnet50/load")
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
    with_parameters = await client.post(f"/v2/repository/models/{MODEL}/load", json={"parameters": {"config": "{}"}})
    assert with_parameters.status_code == 400 and "no parameters" in with_parameters.json()["error"]


@asynccontextmanager
async def app_serving(link: Path, **settings: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(model_dir=link, precision="fp32", max_batch_size=4, log_requests=False, **settings))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://camserve", timeout=60) as client,
    ):
        yield client


async def test_model_control_is_off_by_default_and_behind_the_api_key_when_on(bundles, tmp_path):
    """As Triton's --model-control-mode=none: by default no client can make the service rebuild its engine."""
    assert Settings().model_control is False
    link = tmp_path / "current"
    point(link, bundles.first)
    async with app_serving(link) as client:
        first = await version_of(client)
        point(link, bundles.second)  # a reload would now change the version
        refused = await client.post(f"/v2/repository/models/{MODEL}/load")
        assert refused.status_code == 403
        assert "CAMSERVE_MODEL_CONTROL=true" in refused.json()["error"] and "SIGHUP" in refused.json()["error"]
        assert (await client.post("/v2/repository/models/resnet50/load")).status_code == 403  # names nothing
        assert await version_of(client) == first
        index = (await client.post("/v2/repository/index")).json()  # reading the repository stays open
        assert {"name": MODEL, "version": first, "state": "READY", "reason": ""} in index

    point(link, bundles.first)
    async with app_serving(link, model_control=True, api_key="sesame") as client:
        point(link, bundles.second)
        assert (await client.post(f"/v2/repository/models/{MODEL}/load")).status_code == 401
        assert await version_of(client) == first
        loaded = await client.post(f"/v2/repository/models/{MODEL}/load", headers={"X-API-Key": "sesame"})
        assert loaded.status_code == 200 and loaded.json()["previous_version"] == first
        assert await version_of(client) == loaded.json()["version"] != first


def _damaged(source: Path, root: Path, name: str, damage) -> Path:
    """A copy of ``source`` whose model.json ``damage`` edits (weights untouched: the checksum still matches)."""
    copy = root / name / MODEL
    shutil.copytree(source, copy)
    meta = json.loads((copy / METADATA_FILE).read_text())
    damage(meta)
    (copy / METADATA_FILE).write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda m: m.update(std=[0, 0, 0]), "'std' [0, 0, 0] must lie in (0, 1]"),
        (lambda m: m.update(mean=[1e308, 0.5, 0.5]), "'mean' [1e+308, 0.5, 0.5] must lie in [0, 1]"),
        (lambda m: m.update(calibration={"temperature": 0.5, "test": []}), "'calibration.test'"),
        (lambda m: m.update(gradcam=[]), "'gradcam'"),
        (lambda m: m["misclassified"][0].update(file="/etc/hostname"), "'/etc/hostname' must be a relative path"),
    ],
)
async def test_a_bundle_the_service_cannot_serve_is_refused_on_reload(served, bundles, tmp_path, damage, message):
    """Each loaded before (issue 24), and then every answer, /health, the load itself or /misclassified went wrong."""
    client = served.client
    first = await version_of(client)
    point(served.link, _damaged(bundles.second, tmp_path, "damaged", damage))
    refused = await client.post(f"/v2/repository/models/{MODEL}/load")
    assert refused.status_code == 400, refused.text
    assert f"still serving {first}" in refused.json()["error"] and message in refused.json()["error"]
    assert (await client.get("/health")).status_code == 200 and await version_of(client) == first
    answer = await client.post("/predict", files=[("files", ("a.png", PNG))])
    assert answer.status_code == 200 and answer.json()["model_version"] == first
    total = (await client.get("/misclassified", params={"n": 1})).json()["total"]
    gallery = (await client.get("/misclassified", params={"n": total})).json()["items"]
    assert len(gallery) == total > 0 and all(item["file"].startswith("misclassified/") for item in gallery)


def test_a_batch_straddling_a_swap_runs_each_image_on_its_own_engine():
    """The batchers' run_batch: one call per engine in the batch, rows back in the batch's order."""

    class Engine:
        def __init__(self, offset: float) -> None:
            self.offset, self.calls = offset, []

        def predict(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
            self.calls.append(len(images))
            return [image + self.offset for image in images]

    old, new = Engine(0.0), Engine(100.0)
    run = pinned_batch(run_predict)
    items = [Pinned(old, torch.tensor(0.0)), Pinned(new, torch.tensor(1.0)), Pinned(old, torch.tensor(2.0))]
    assert [float(row) for row in run(items)] == [0.0, 101.0, 2.0]
    assert old.calls == [2] and new.calls == [1]
    assert [float(row) for row in run([Pinned(new, torch.tensor(3.0))] * 2)] == [103.0, 103.0]
    assert new.calls == [1, 2]


@pytest.mark.server
def test_sighup_and_tritonclient_load_reload_a_real_server(bundles, tmp_path):
    tritonclient_http = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    link = tmp_path / "current"
    point(link, bundles.first)
    key = {"X-API-Key": "sesame"}
    settings = {"precision": "fp32", "max_batch_size": "4", "api_key": "sesame", "model_control": "true"}
    with camserve(link, tmp_path / "server.log", **settings) as running:
        base, process = running.base_url, running.process
        first = httpx.get(f"{base}/health").json()["model"]["version"]
        client = tritonclient_http.InferenceServerClient(base.removeprefix("http://"))
        try:
            with pytest.raises(InferenceServerException, match="API key"):
                client.load_model(MODEL)  # the repository extension sits behind the API key
            point(link, bundles.second)
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: version_at(base) != first, 60, interval_s=0.1, what="the reload on SIGHUP")
            version = version_at(base)
            assert process.poll() is None  # SIGHUP reloads; it no longer ends the process
            point(link, bundles.first)
            client.load_model(MODEL, headers=key)
            assert client.get_model_repository_index(headers=key)[0]["version"] == first != version
            point(link, bundles.corrupt)
            process.send_signal(signal.SIGHUP)  # refused: logged, and the server keeps serving the first
            with pytest.raises(InferenceServerException, match="sha256"):
                client.load_model(MODEL, headers=key)
            answer = httpx.post(f"{base}/predict", headers=key, files=[("files", ("a.png", PNG))])
            assert answer.status_code == 200 and answer.json()["model_version"] == first
        finally:
            client.close()
    assert "SIGHUP reload refused" in (tmp_path / "server.log").read_text()


async def test_a_replaced_engine_is_freed(served, bundles):
    """Nothing keeps the old engine (its model, traced module and cast weights) once it has no requests."""
    first = weakref.ref(served.app.state.camserve.engine)
    point(served.link, bundles.second)
    assert (await served.client.post(f"/v2/repository/models/{MODEL}/load")).status_code == 200
    gc.collect()
    assert first() is None


@pytest.mark.server
def test_a_load_request_reloads_every_worker_of_a_multi_worker_service_exactly_once(bundles, tmp_path):
    """With CAMSERVE_WORKERS=2 the load request reaches one worker; the supervisor has the other reload too,
    and only the other: each worker swaps in the new bundle once (issue 24: the asking worker reloaded twice)."""
    link = tmp_path / "current"
    point(link, bundles.first)
    settings = {"workers": "2", "precision": "fp32", "max_batch_size": "4", "log_requests": "false"}
    with camserve(link, tmp_path / "server.log", model_control="true", **settings) as running:
        base = running.base_url
        deadline = time.monotonic() + 120
        while (workers := httpx.get(f"{base}/health", timeout=10).json()["workers"])["ready"] < 2:
            assert time.monotonic() < deadline, "two workers never became ready"
            time.sleep(0.2)
        pids = {slot["pid"] for slot in workers["slots"]}

        def versions(count: int = 16) -> set[str]:
            """What fresh connections (spread over the workers by the kernel) are answered with."""
            return {
                httpx.post(f"{base}/predict", files=[("files", ("a.png", PNG))], timeout=60).json()["model_version"]
                for _ in range(count)
            }

        first = versions()
        assert len(first) == 1
        point(link, bundles.second)
        loaded = httpx.post(f"{base}/v2/repository/models/{MODEL}/load", timeout=120)
        assert loaded.status_code == 200, loaded.text
        new = loaded.json()["version"]
        assert {new} != first
        # the other worker swaps in the new bundle shortly after
        wait_until(lambda: versions() == {new}, 120, interval_s=0.2, what="every worker on the new bundle")
        assert all(versions(32) == {new} for _ in range(2))

        # The supervisor says how many workers its SIGHUP reloads; once those and the asking worker have
        # logged their swap, every reload this load request caused is in the log.
        def log() -> str:
            return running.log_path.read_text()

        while (signalled := re.search(r"SIGHUP: reloading the bundle in (\d+) worker", log())) is None:
            assert time.monotonic() < deadline + 240, log()[-3000:]
            time.sleep(0.2)
        reloads = re.compile(r"\[(\d+)\] camserve\.reload: reloaded test-bundle: ")
        while len(reloads.findall(log())) < 1 + int(signalled.group(1)):
            assert time.monotonic() < deadline + 240, log()[-3000:]
            time.sleep(0.2)
        assert running.process.poll() is None
        assert int(signalled.group(1)) == 1  # only the worker that was not asked
        per_worker = Counter(int(pid) for pid in reloads.findall(log()))
        assert per_worker == dict.fromkeys(pids, 1), per_worker

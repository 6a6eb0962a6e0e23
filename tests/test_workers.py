"""``CAMSERVE_WORKERS=2``: two processes on one port, one service to the outside (real servers on loopback)."""

from __future__ import annotations

import http.client
import itertools
import json
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch
from harness import camserve, metric, multipart_body, run_camserve, scrape, wait_until
from helpers import encode, random_image

from service.inference.cpus import available_cpus, cgroup_cpu_quota
from service.runtime.slots import cpu_share, queue_share
from service.runtime.supervisor import responsive, worker_count

# Small batches keep start-up (trace, warm-up) short; fp32 so the two runs cannot pick differently.
COMMON = {"precision": "fp32", "max_batch_size": "8", "log_requests": "false"}


@contextmanager
def service(model_dir: Path, log: Path, **settings: str) -> Iterator[tuple[str, object]]:
    """A started ``python -m service``, every one of its workers ready (the kit waits for them)."""
    with camserve(model_dir, log, **settings) as running:
        yield running.base_url, running.process


def image(seed: int) -> bytes:
    return encode(random_image(seed, size=(32 + seed % 5, 32)))


def ask(client: httpx.Client, base: str, seed: int) -> dict:
    """/predict for even seeds, /gradcam for odd ones; multipart or raw body alternately."""
    endpoint = "/predict?top_k=10" if seed % 2 == 0 else "/gradcam"
    if seed % 4 < 2:
        response = client.post(base + endpoint, files={"files": (f"img{seed}.png", image(seed))})
    else:
        headers = {"content-type": "image/png", "content-disposition": f'inline; filename="img{seed}.png"'}
        response = client.post(base + endpoint, content=image(seed), headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def assert_same_answer(alone: dict, together: dict) -> None:
    """Same classes in the same order; numbers equal up to what batch composition changes in fp32."""
    if "predictions" in alone:
        (a,), (b,) = alone["predictions"], together["predictions"]
        assert a["filename"] == b["filename"]
        assert [row["label"] for row in a["top_k"]] == [row["label"] for row in b["top_k"]]
        np.testing.assert_allclose(
            [r["probability"] for r in a["top_k"]], [r["probability"] for r in b["top_k"]], atol=1e-5
        )
    else:
        (a,), (b,) = alone["results"], together["results"]
        assert (a["filename"], a["label"], a["target"]) == (b["filename"], b["label"], b["target"])
        np.testing.assert_allclose(a["probability"], b["probability"], atol=1e-5)
        np.testing.assert_allclose(np.array(a["heatmap"]), np.array(b["heatmap"]), atol=2e-3)


# -- the rules, without servers --------------------------------------------------------------------
def test_auto_worker_count_rule() -> None:
    assert [worker_count("auto", cpus) for cpus in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]
    assert worker_count(3, 2) == 3  # an explicit count is taken as given


@pytest.mark.parametrize("total_size,count", [(512, 2), (7, 3), (5, 5), (100, 7)])
def test_queue_shares_add_up_to_the_service_bound(total_size: int, count: int) -> None:
    shares = [queue_share(total_size, count, i) for i in range(count)]
    assert sum(shares) == total_size and max(shares) - min(shares) <= 1 and min(shares) >= 1
    assert sum(cpu_share(total_size, count, i) for i in range(count)) == total_size


class FakeWorker:
    """What :func:`responsive` reads of a uvicorn worker: its process and the parent's end of its pipe."""

    def __init__(self, alive: Iterator[bool]) -> None:
        self.parent_conn, self.child_conn = multiprocessing.Pipe()
        self.process = SimpleNamespace(is_alive=lambda: next(alive))


@pytest.mark.timeout(30)  # far less than the timeout given: a wait to the end would fail the test
def test_a_worker_that_exits_is_noticed_at_once_not_after_the_health_check_timeout() -> None:
    exiting = FakeWorker(iter([True, *[False] * 10]))  # alive when pinged, gone while its answer is awaited
    assert not responsive(exiting, timeout_s=600, slice_s=0.05)
    assert exiting.child_conn.recv() == b"ping"  # it was asked
    assert not responsive(FakeWorker(iter([False])), timeout_s=600)  # gone already: not even asked

    answering = FakeWorker(itertools.repeat(True))

    def pong() -> None:
        assert answering.child_conn.recv() == b"ping"
        answering.child_conn.send(True)

    thread = threading.Thread(target=pong)
    thread.start()
    assert responsive(answering, timeout_s=600, slice_s=0.05)
    thread.join()
    silent = FakeWorker(itertools.repeat(True))  # alive but never answering: the timeout still holds
    assert not responsive(silent, timeout_s=0.2, slice_s=0.05)


def fake_cgroup(root: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_v2_quota_caps_the_cpu_count(tmp_path: Path) -> None:
    root = fake_cgroup(
        tmp_path / "v2",
        {
            "proc/self/cgroup": "0::/kubepods/pod1/ctr\n",
            "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000\n",  # no limit on the container itself
            "sys/fs/cgroup/kubepods/pod1/cpu.max": "250000 100000\n",  # 2.5 CPUs on the pod: the tightest
            "sys/fs/cgroup/kubepods/cpu.max": "800000 100000\n",
        },
    )
    assert cgroup_cpu_quota(root) == 2.5
    assert available_cpus(root, affinity=64) == 2  # rounded down: a third thread would be throttled
    assert available_cpus(root, affinity=1) == 1  # the affinity mask still counts


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    v1 = fake_cgroup(
        tmp_path / "v1",
        {
            "proc/self/cgroup": "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n",
            # The container's own cgroup mounted as the root of the hierarchy (the host path is absent).
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "50000\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        },
    )
    assert cgroup_cpu_quota(v1) == 0.5 and available_cpus(v1, affinity=64) == 1
    unlimited = fake_cgroup(
        tmp_path / "none",
        {
            "proc/self/cgroup": "3:cpu,cpuacct:/\n0::/\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "sys/fs/cgroup/cpu.max": "max 100000\n",
        },
    )
    assert cgroup_cpu_quota(unlimited) is None and available_cpus(unlimited, affinity=64) == 64
    assert cgroup_cpu_quota(tmp_path / "absent") is None


# -- two workers, real servers ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_workers(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("workers") / "server.log"
    with service(bundle_dir, log, workers="2", queue_size="512", **COMMON) as (base, _):
        yield base


@pytest.fixture(scope="module")
def one_process(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    log = tmp_path_factory.mktemp("one") / "server.log"
    with service(bundle_dir, log, workers="1", **COMMON) as started:
        yield started


@pytest.mark.server
def test_one_worker_is_one_process_without_a_supervisor(one_process) -> None:
    base, process = one_process
    health = httpx.get(f"{base}/health").json()
    assert health["workers"]["count"] == 1 and health["workers"]["slots"][0]["pid"] == process.pid
    assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}


@pytest.mark.server
def test_health_describes_the_service(two_workers: str) -> None:
    health = httpx.get(f"{two_workers}/health").json()
    workers = health["workers"]
    assert workers["count"] == 2 and workers["ready"] == 2 and workers["queue_size"] == 512
    assert [s["queue_size"] for s in workers["slots"]] == [256, 256]
    assert len({s["pid"] for s in workers["slots"]}) == 2 and all(s["status"] == "ready" for s in workers["slots"])
    assert health["batching"]["queue_size"] == 512  # the service's bound, not one worker's share
    assert httpx.get(f"{two_workers}/readyz").json() == {"status": "ready", "workers": 2, "workers_ready": 2}


@pytest.mark.server
def test_both_workers_take_connections(two_workers: str) -> None:
    seen: set[int] = set()
    for _ in range(10):  # the kernel picks the accepting process: a few bursts of fresh connections
        with ThreadPoolExecutor(16) as pool:
            bodies = pool.map(lambda _: httpx.get(f"{two_workers}/health", timeout=30).json(), range(32))
            seen |= {body["workers"]["this_worker"] for body in bodies}
        if seen == {0, 1}:
            break
    assert seen == {0, 1}


@pytest.mark.server
def test_64_images_at_once_each_get_the_answer_they_get_alone(two_workers: str, one_process) -> None:
    seeds = list(range(64))
    with httpx.Client(timeout=60) as client:  # one at a time, from the one-process service
        alone = {seed: ask(client, one_process[0], seed) for seed in seeds}
    before = scrape(two_workers)

    def concurrently(seed: int) -> dict:
        with httpx.Client(timeout=60) as client:  # a connection each: spread over both workers
            return ask(client, two_workers, seed)

    barrier = threading.Barrier(len(seeds))

    def at_once(seed: int) -> dict:
        barrier.wait()
        return concurrently(seed)

    with ThreadPoolExecutor(len(seeds)) as pool:
        together = dict(zip(seeds, pool.map(at_once, seeds), strict=True))
    for seed in seeds:
        assert_same_answer(alone[seed], together[seed])

    # One scrape counts every worker's requests and images.
    after = scrape(two_workers)
    for endpoint in ("/predict", "/gradcam"):
        served = metric(after, "camserve_requests_total", endpoint=endpoint, status="200") - metric(
            before, "camserve_requests_total", endpoint=endpoint, status="200"
        )
        images = metric(after, "camserve_images_total", endpoint=endpoint) - metric(
            before, "camserve_images_total", endpoint=endpoint
        )
        assert served == 32 and images == 32
    assert "camserve_model_info" in {name for name, _ in after}


@pytest.mark.server
def test_overload_sheds_503_across_workers_and_one_scrape_counts_it(bundle_dir: Path, tmp_path: Path) -> None:
    # Each worker: 1 image in its batch, 2 waiting (queue 4 split in 2); each batch takes 300 ms.
    settings = {**COMMON, "engine": "null", "null_batch_ms": "300", "max_batch_size": "1", "model_lanes": "1"}
    with service(bundle_dir, tmp_path / "overload.log", workers="2", queue_size="4", **settings) as (base, _):
        with ThreadPoolExecutor(24) as pool:
            responses = list(
                pool.map(
                    lambda s: httpx.post(f"{base}/predict", files={"files": ("x.png", image(s))}, timeout=60),
                    range(24),
                )
            )
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0
        # At least what one worker holds at once (1 running + 2 queued); which worker accepts how many
        # connections is the kernel's and the event loops' race, so not more than that is certain.
        assert codes.count(200) >= 3
        assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
        samples = scrape(base)
        assert metric(samples, "camserve_rejections_total", reason="queue_full") == codes.count(503)
        assert metric(samples, "camserve_requests_total", endpoint="/predict", status="503") == codes.count(503)
        assert metric(samples, "camserve_requests_total", endpoint="/predict", status="200") == codes.count(200)
        assert (httpx.post(f"{base}/predict", files={"files": ("x.png", image(0))}, timeout=60)).status_code == 200


@pytest.mark.server
def test_sigterm_under_load_answers_every_accepted_request_and_exits_0(bundle_dir: Path, tmp_path: Path) -> None:
    settings = {**COMMON, "engine": "null", "null_batch_ms": "150", "max_batch_size": "1", "model_lanes": "1"}
    with service(bundle_dir, tmp_path / "drain.log", workers="2", **settings) as (base, process):
        host, port = base.removeprefix("http://").split(":")
        connections = []
        for seed in range(12):  # every request sent in full before anything else happens
            body = multipart_body([(f"img{seed}.png", image(seed))], part_type=None)
            connection = http.client.HTTPConnection(host, int(port), timeout=60)
            connection.request("POST", "/predict", body=body.data, headers={"Content-Type": body.content_type})
            connections.append(connection)
        # The first answer comes after a 150 ms batch during which both event loops sat idle, so every
        # request sent with it has been read: ~0.9 s of queued work when SIGTERM arrives.
        first = connections[0].getresponse()
        process.send_signal(signal.SIGTERM)
        responses = [first] + [connection.getresponse() for connection in connections[1:]]
        codes = [response.status for response in responses]
        answers = [json.loads(response.read()) for response in responses]
        assert codes == [200] * 12
        assert [a["predictions"][0]["filename"] for a in answers] == [f"img{seed}.png" for seed in range(12)]
        assert process.wait(timeout=60) == 0
        log = (tmp_path / "drain.log").read_text()
        assert log.count("Application shutdown complete") == 2


@pytest.mark.server
def test_a_killed_worker_is_restarted_and_the_service_keeps_answering(bundle_dir: Path, tmp_path: Path) -> None:
    with service(bundle_dir, tmp_path / "kill.log", workers="2", engine="null", **COMMON) as (base, process):
        post = lambda: httpx.post(f"{base}/predict", files={"files": ("x.png", image(1))}, timeout=60)  # noqa: E731
        assert post().status_code == 200
        slots = httpx.get(f"{base}/health").json()["workers"]["slots"]
        victim = slots[1]["pid"]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            try:
                now = httpx.get(f"{base}/health", timeout=5).json()["workers"]
            except (httpx.HTTPError, ValueError):
                return False
            slot = now["slots"][1]
            return now["ready"] == 2 and slot["pid"] not in (None, victim) and slot["status"] == "ready"

        wait_until(replaced, 120, interval_s=0.1, what="the killed worker replaced")
        assert process.poll() is None  # the supervisor is still serving, with two workers again
        codes = [post().status_code for _ in range(8)]
        assert codes == [200] * 8
        samples = scrape(base)
        assert metric(samples, "camserve_requests_total", endpoint="/predict", status="200") >= 9
        assert "died" in (tmp_path / "kill.log").read_text()


@pytest.mark.server
@pytest.mark.timeout(60)  # a dead worker is noticed at once, not after the 30 s health-check timeout
def test_workers_that_cannot_start_stop_the_service_with_a_failure_status(bundle_dir: Path) -> None:
    # The supervisor starts (fp32 needs no timing there), each worker's start-up fails on the absent GPU.
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    done = run_camserve(bundle_dir, timeout_s=50, workers=2, precision="fp32", device="cuda")
    assert done.returncode != 0
    assert "failed to start" in done.stdout + done.stderr

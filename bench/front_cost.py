"""Issue 26's front benchmark in one run: what camserve's front costs per request above the floors under the
same uvicorn, and what the served ``/predict`` does with the real engine against its own ceiling and LitServe.

Part 1, the front alone (``CAMSERVE_ENGINE=null``: answers of the right shape, no network; one process):

* the floors (``bench/floor_apps.py`` under ``uvicorn --http httptools``, one process): a bare ASGI
  callable, a Starlette route and a FastAPI route reading the raw body, and a FastAPI route reading the
  multipart form's one file, each answering a fixed top-3 JSON (and, beside them, that last route decoding the
  PNG with Pillow too); camserve runs on the same uvicorn, with its own bounded httptools protocol;
* camserve with the null engine: one 32x32 PNG as the raw body and as a multipart upload (``hey -c 32``),
  and one 1600x1200 JPEG of about 1 MB as the raw body (``-c 4``; the FastAPI floor with the same photo too);
* the photo's own decode in this process, Pillow's reduced-scale decode as camserve asks for it
  (``Image.draft`` then ``load``) and camserve's whole decode (``decode_image``): CPU per image.

Each row: req/s, the server's CPU per request (utime + stime of every server process, from /proc), hey's
own CPU per request (its rusage), p50/p99, and how much of the cores other processes took meanwhile.

Part 2, the served ``/predict`` with the real engine: camserve at its default settings except
``CAMSERVE_TTA=none`` (the network work of the ceiling and of LitServe; on this CPU the shipped bundle
serves OpenVINO INT8) and no request log, then LitServe (``bench/litserve_server.py``) on the same runtime,
precision and decode, one at a time, single-image multipart requests at c=1, 32, 128. The model's own
batch-32 ceiling, compiled as camserve compiles it (``bench/runtimes.py``'s child process), is measured
before the first point and after every point, so each point has a ceiling on both sides of it.

    flock -x /tmp/camserve-cpu.lock timeout 900 .venv/bin/python bench/front_cost.py

Writes ``bench/results/front_cost.json`` and ``.md`` (targets checked in ``bench/front_cost_report.py``).
Needs ``hey`` and LitServe (``pip install 'litserve>=0.2,<0.3'``, the ``bench`` extra; ``--skip-litserve``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shlex
import signal
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the service package, from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_bench import cifar_png, photo_jpeg, upload
from front_cost_report import markdown, with_verdicts
from harness import (
    Body,
    camserve,
    free_port,
    machine_cpu_seconds,
    machine_info,
    process_cpu_seconds,
    raw_body,
    request,
    require_hey,
    run_hey,
    server_env,
    server_pids,
    serving,
)
from runtimes import Model
from serve_bench import Launcher, check_answer, require_litserve, versions

from service.decoding.probe import decode_image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DRAFT_REQUEST = (64, 64)  # what service/decoding/probe.py asks libjpeg for: twice the 32-px network input
FLOORS = {  # floor_apps app -> the bodies it is loaded with
    "asgi": ("raw",),
    "starlette": ("raw",),
    "fastapi": ("raw", "photo"),
    "fastapi_multipart": ("multipart",),
    "fastapi_multipart_decode": ("multipart",),  # no target's floor: the same route decoding the PNG too
}
CAMSERVE_NULL = ("raw", "multipart", "photo")
PHOTO_QUALITY = 90  # 1600x1200 at quality 90: 1.02 MB, the "1 MB photo"
SERVED_CONCURRENCY = (1, 32, 128)


# -- CPU accounting ---------------------------------------------------------------------------------
def tree(root: int) -> list[int]:
    """``root`` and its descendants, retried while a process exits mid-walk."""
    for _ in range(5):
        with contextlib.suppress(OSError):
            return server_pids(root)
    return [root]


def cpu_of(pids: list[int]) -> dict[int, float]:
    cpu = {}
    for pid in pids:
        with contextlib.suppress(OSError):  # gone since the walk
            cpu[pid] = process_cpu_seconds(pid)
    return cpu


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(after[pid] - before[pid] for pid in before.keys() & after.keys())


def load_row(hey: str, url: str, body: Body, concurrency: int, seconds: float, server_root: int) -> dict:
    """One timed ``hey`` run: throughput, latency, the CPU of the server's processes and of hey per request,
    and the share of the cores that processes other than this run's took meanwhile (others' load)."""
    server, ours = tree(server_root), tree(os.getpid())  # ours: this process, every server, the ceiling's child
    machine0, server0, ours0 = machine_cpu_seconds(), cpu_of(server), cpu_of(ours)
    hey0, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    parsed = run_hey(hey, url, body, concurrency=concurrency, seconds=seconds)
    wall, hey1 = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
    server1, ours1, machine1 = cpu_of(server), cpu_of(ours), machine_cpu_seconds()
    codes, ok = parsed["status_codes"], parsed["status_codes"].get("200", 0)
    if not ok or set(codes) - {"200"} or parsed["errors"]:
        raise RuntimeError(f"{url} c={concurrency}: answers {codes}, errors {parsed['errors'][:2]}")
    hey_cpu = (hey1.ru_utime - hey0.ru_utime) + (hey1.ru_stime - hey0.ru_stime)
    others = (machine1[0] - machine0[0]) - spent(ours0, ours1) - hey_cpu
    cores = len(os.sched_getaffinity(0))
    percentile = {
        p: round(s * 1000, 2) if (s := parsed["percentiles_s"].get(p)) is not None else None for p in (50, 99)
    }
    return {
        "concurrency": concurrency,
        "requests": ok,
        "req_per_s": round(ok / parsed["total_s"], 1),
        "server_cpu_us_per_request": round(spent(server0, server1) * 1e6 / ok),
        "hey_cpu_us_per_request": round(hey_cpu * 1e6 / ok),
        "p50_ms": percentile[50],
        "p99_ms": percentile[99],
        "others_cpu_share": round(max(0.0, others) / (wall * cores), 3),
        "steal_share": round((machine1[1] - machine0[1]) / (wall * cores), 3),
    }


def timed(hey: str, url: str, body: Body, concurrency: int, args: argparse.Namespace, root: int, warmup: float):
    run_hey(hey, url, body, concurrency=concurrency, seconds=warmup)  # connections, caches, batch shapes
    row = load_row(hey, url, body, concurrency, args.seconds, root)
    print(f"  {url.split('/')[-1]} c={concurrency}: {json.dumps(row)}", flush=True)
    return row


# -- part 1: the front alone -------------------------------------------------------------------------
def concurrency_for(body: str, args: argparse.Namespace) -> int:
    return args.photo_concurrency if body == "photo" else args.concurrency


def floor_rows(hey: str, bodies: dict[str, Body], args: argparse.Namespace, scratch: Path) -> dict[str, dict]:
    rows = {}
    for app, kinds in FLOORS.items():
        port = free_port()
        command = [sys.executable, "-m", "uvicorn", f"floor_apps:{app}", "--app-dir", str(REPO / "bench")]
        command += ["--host", "127.0.0.1", "--port", str(port), "--http", "httptools", "--no-access-log"]
        command += ["--log-level", "warning"]
        log = scratch / f"{app}.log"
        with serving(app, command, server_env(), port, log, ready_path=None, start_timeout_s=60) as up:
            for kind in kinds:
                print(f"[floor] {app}, {kind}", flush=True)
                row = timed(hey, up.base_url + "/predict", bodies[kind], concurrency_for(kind, args), args, up.pid, 1)
                rows[f"{app}/{kind}"] = {"server": app, "body": kind, **row}
    return rows


def camserve_null_rows(hey: str, bodies: dict[str, Body], args: argparse.Namespace, scratch: Path) -> dict:
    settings = {"engine": "null", "tta": "none", "workers": 1, "log_requests": "false", "log_level": "warning"}
    rows = {}
    with camserve(None, scratch / "camserve-null.log", inherit_settings=False, **settings) as up:
        for kind in CAMSERVE_NULL:
            print(f"[camserve] null engine, {kind}", flush=True)
            check_answer(up, "/predict", bodies[kind])
            row = timed(hey, up.base_url + "/predict", bodies[kind], concurrency_for(kind, args), args, up.pid, 1)
            rows[f"camserve/{kind}"] = {"server": "camserve (null engine)", "body": kind, **row}
    return rows


def cpu_per_call(step, seconds: float) -> float:
    """This thread's CPU microseconds per ``step()`` over about ``seconds`` (at least 5 calls, 3 discarded first)."""
    for _ in range(3):
        step()
    calls, started, deadline = 0, time.thread_time(), time.perf_counter() + seconds
    while time.perf_counter() < deadline or calls < 5:
        step()
        calls += 1
    return (time.thread_time() - started) * 1e6 / calls


def decode_costs(photo: bytes, seconds: float) -> dict:
    """The photo's decode in this process, single thread: the reference the photo row is held to."""

    def draft_load() -> tuple[int, int]:
        with Image.open(io.BytesIO(photo)) as image:
            image.draft("RGB", DRAFT_REQUEST)
            image.load()
            return image.size

    return {
        "draft_load_cpu_us": round(cpu_per_call(draft_load, seconds)),
        "draft_size": list(draft_load()),
        "decode_image_cpu_us": round(
            cpu_per_call(lambda: decode_image(photo, "photo.jpg", max_pixels=1 << 25), seconds)
        ),
    }


# -- part 2: the served /predict ---------------------------------------------------------------------
def ceiling(model: Model, seconds: float) -> dict:
    """The model alone at batch 32: images/s, about how much CPU per image (its process's time over the wall
    time of the call times the rate), and the share of the cores every other process took meanwhile (the
    idle server's leftovers included: a ceiling is only as good as the quiet around it)."""
    machine0, cpu0, started = machine_cpu_seconds()[0], process_cpu_seconds(model.process.pid), time.perf_counter()
    images_per_s = model.measure(32, seconds)
    wall, cpu = time.perf_counter() - started, process_cpu_seconds(model.process.pid) - cpu0
    besides = machine_cpu_seconds()[0] - machine0 - cpu
    return {
        "images_per_s": round(images_per_s, 1),
        "cpu_us_per_image": round(cpu * 1e6 / (images_per_s * wall)),
        "besides_cpu_share": round(max(0.0, besides) / (wall * len(os.sched_getaffinity(0))), 3),
    }


def settle(root: int, timeout_s: float = 60.0, idle_cores: float = 0.2) -> float:
    """Until the server's processes use under ``idle_cores`` over half a second (an idle LitServe polls its
    queues at about 0.08), so that no start-up work is left to run beside the first ceiling; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        pids = tree(root)
        before = cpu_of(pids)
        time.sleep(0.5)
        if spent(before, cpu_of(pids)) < idle_cores * 0.5:
            break
    return round(time.monotonic() - started, 1)


def served_points(hey: str, name: str, up, body: Body, model: Model, args: argparse.Namespace) -> list[dict]:
    """Every concurrency on one server, the ceiling measured before the first and after each point."""
    check_answer(up, "/predict", body)
    print(f"  idle after {settle(up.pid)} s", flush=True)
    before, points = ceiling(model, args.ceiling_seconds), []
    for concurrency in SERVED_CONCURRENCY:
        print(f"[{name}] /predict c={concurrency}", flush=True)
        row = timed(hey, up.base_url + "/predict", body, concurrency, args, up.pid, args.warmup)
        after = ceiling(model, args.ceiling_seconds)
        mean = round((before["images_per_s"] + after["images_per_s"]) / 2, 1)
        points.append({"server": name, **row, "ceiling_before": before, "ceiling_after": after, "ceiling_mean": mean})
        print(f"  ceiling {before['images_per_s']} -> {after['images_per_s']} images/s", flush=True)
        before = after
    return points


def served(hey: str, body: Body, args: argparse.Namespace, scratch: Path) -> dict:
    """camserve's points, then LitServe's (one server up at a time: an idle LitServe polls its queues), one
    ceiling model for both, started once camserve says what it runs."""
    settings = {"tta": "none", "log_requests": "false", "log_level": "warning"}
    model = None
    try:
        print("[camserve] real engine", flush=True)
        with camserve(args.model_dir, scratch / "camserve.log", inherit_settings=False, **settings) as up:
            health = json.loads(request("GET", up.base_url + "/health")[1])
            runtime, precision = health["runtime"].split()[0], health["precision"]
            key = (runtime, precision, int(health["batching"]["model_lanes"]))  # as camserve's engine compiles it
            print(f"  {health['runtime']} {precision}; ceiling model {key}", flush=True)
            model = Model(key, args.model_dir)
            points = served_points(hey, "camserve", up, body, model, args)
        if not args.skip_litserve:
            with Launcher(scratch, args.start_timeout).litserve(args.model_dir, precision, runtime) as peer:
                points += served_points(hey, "litserve", peer, body, model, args)
    finally:
        if model is not None:
            model.close()
    keep = ("runtime", "runtime_reason", "precision", "precision_reason", "test_time_augmentation", "batching")
    return {"camserve": {k: health.get(k) for k in keep}, "ceiling_model": list(key), "points": points}


# -- the run -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per row (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="discarded seconds before each served row")
    parser.add_argument("--ceiling-seconds", type=float, default=3.0, help="per ceiling measurement")
    parser.add_argument("--decode-seconds", type=float, default=2.0, help="per in-process decode measurement")
    parser.add_argument("--concurrency", type=int, default=32, help="hey -c for the 32x32 PNG rows of part 1")
    parser.add_argument("--photo-concurrency", type=int, default=4, help="hey -c for the photo rows")
    parser.add_argument("--skip-served", action="store_true", help="part 1 only")
    parser.add_argument("--skip-litserve", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds per server start")
    parser.add_argument("--output", type=Path, default=RESULTS / "front_cost.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # servers stop in finally
    hey = require_hey()
    if not (args.skip_served or args.skip_litserve):
        require_litserve()
    machine, started = machine_info(), time.perf_counter()  # before any server: the load average says who else ran
    when = datetime.now(UTC).isoformat(timespec="seconds")
    png, photo = cifar_png(), photo_jpeg(quality=PHOTO_QUALITY)
    with tempfile.TemporaryDirectory(prefix="front-cost-") as tmp:
        scratch = Path(tmp)
        bodies = {
            "raw": raw_body(png, "image/png", scratch / "raw.bin"),
            "multipart": upload("cifar.png", png, scratch / "multipart.bin"),
            "photo": raw_body(photo, "image/jpeg", scratch / "photo.bin"),
        }
        rows = floor_rows(hey, bodies, args, scratch) | camserve_null_rows(hey, bodies, args, scratch)
        print("[decode] the photo, in process", flush=True)
        decode = decode_costs(photo, args.decode_seconds)
        serving_part = None if args.skip_served else served(hey, bodies["multipart"], args, scratch)
    wall = time.perf_counter() - started
    machine["load_average_at_end"] = os.getloadavg()
    record = {
        "when": when,
        "command": shlex.join(["python", "bench/front_cost.py", *sys.argv[1:]]),
        "run_seconds": round(wall),
        "machine": machine,
        "versions": versions(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "model_dir")},
        "inputs": {
            "png": {"bytes": len(png), "size": [32, 32]},
            "photo": {"bytes": len(photo), "size": list(Image.open(io.BytesIO(photo)).size), "format": "JPEG"},
        },
        "front": rows,
        "decode": decode,
        "served": serving_part,
    }
    record = with_verdicts(record)
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    text = markdown(record)
    args.output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

"""Serving benchmark: camserve under ``hey`` against its unbatched self, the bare model and LitServe.

One run measures, on this machine and at one precision (the one camserve picks, or ``--precision``):

* camserve (``python -m service``): single-image ``/predict`` and ``/gradcam`` at each concurrency,
  plus bulk ``/predict`` requests of 32 images at concurrency 8;
* the same server with ``CAMSERVE_MAX_BATCH_SIZE=1``: what the dynamic batcher buys (on a CPU it
  still runs two single-image forwards at once, one per model lane), and the same with
  ``CAMSERVE_MODEL_LANES=1``, the classic unbatched server that runs one request at a time;
* the in-process ceiling: the model alone on pre-decoded uint8 batches of 32 and of 1, no HTTP,
  no decoding; the most this machine can do;
* LitServe (``bench/litserve_server.py``) serving the same network with its own batching
  (``max_batch_size=32``, ``batch_timeout=0.005``): the peer a user would pick instead.

The load comes from ``hey`` (a Go binary) because a Python client saturates 2 cores long before the
server does. Each point is a warm-up run at the same concurrency (discarded), then a timed run.
Servers listen on loopback only and are always stopped, SIGTERM then SIGKILL, as a process group
(LitServe forks workers that a signal to its parent alone would orphan).

    python bench/serve_bench.py                       # full run, ~5 minutes; results in bench/results/
    python bench/serve_bench.py --quick               # smoke run: 2 s per point, c = 1 and 8
    python bench/serve_bench.py --model-dir /tmp/bench-bundle --precision fp32 --duration 20

Needs ``hey`` (``apt-get install -y hey``) and, unless ``--skip litserve``, ``pip install litserve``.
Results: ``bench/results/serve_bench.{json,md,png}`` (``serve_bench_quick.*`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the service package, from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_report and the kit, also under `python -m`

import harness
from harness import (
    DEFAULT_START_TIMEOUT_S,
    HEY_REQUEST_TIMEOUT_S,
    Body,
    Server,
    free_port,
    log_tail,
    machine_info,
    multipart_body,
    request,
    require_hey,
    run_hey,
    server_env,
)
from serve_report import write_reports

from camcore.bundle import load_bundle
from camcore.forward import AUTOCAST_DTYPES, ServedForward
from service.decoding.probe import decode_image
from service.inference.torch_engine import resolve_device

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_MODEL_DIR = Path(os.environ.get("CAMSERVE_MODEL_DIR", ROOT / "models" / "cifar10-resnet"))
TARGETS = ("camserve", "unbatched", "unbatched_1lane", "camserve_tta", "litserve", "ceiling")
LITSERVE = {"max_batch_size": 32, "batch_timeout_s": 0.005, "workers_per_device": 1, "num_api_servers": 1}


# -- results --------------------------------------------------------------------------------------
@dataclass
class Point:
    """One measured configuration; ``concurrency`` is None for the in-process ceiling."""

    target: str
    endpoint: str
    concurrency: int | None
    images_per_request: int
    images_per_s: float
    requests_per_s: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    responses: int
    non_200: int
    errors: int
    duration_s: float
    status_codes: dict[str, int] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)


# -- tools ----------------------------------------------------------------------------------------
def require_litserve() -> None:
    if importlib.util.find_spec("litserve") is None:
        sys.exit(
            "serve_bench: LitServe is not installed in this interpreter; "
            f"`{sys.executable} -m pip install 'litserve>=0.2,<0.3'`, or pass --skip litserve"
        )


def versions() -> dict[str, str | None]:
    """What served and what loaded: results from different stacks should not be compared blindly."""
    found: dict[str, str | None] = {}
    for package in ("fastapi", "uvicorn", "starlette", "litserve"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["dpkg-query", "-W", "-f", "${Version}", "hey"]
        found["hey"] = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.strip() or None
    return found


def hey_point(target: str, endpoint: str, images: int, concurrency: int, parsed: dict) -> Point:
    """Throughput counts only 200s: a fast 503 is not a served image."""
    codes = parsed["status_codes"]
    ok = codes.get("200", 0)
    total_s = parsed["total_s"]
    if not total_s:
        raise RuntimeError(f"hey printed no total time for {target} {endpoint} c={concurrency}")
    pct = parsed["percentiles_s"]

    def ms(p: int) -> float | None:
        return pct[p] * 1000 if p in pct else None

    return Point(
        target=target,
        endpoint=endpoint,
        concurrency=concurrency,
        images_per_request=images,
        images_per_s=ok * images / total_s,
        requests_per_s=ok / total_s,
        p50_ms=ms(50),
        p95_ms=ms(95),
        p99_ms=ms(99),
        responses=sum(codes.values()),
        non_200=sum(n for code, n in codes.items() if code != "200"),
        errors=sum(n for n, _ in parsed["errors"]),
        duration_s=total_s,
        status_codes=codes,
        error_messages=[f"{n}x {message}" for n, message in parsed["errors"]][:5],
    )


# -- request bodies -------------------------------------------------------------------------------
def load_images(folder: Path) -> list[tuple[str, bytes]]:
    """Real 32x32 test images: by default the bundle's own misclassified PNGs."""
    files = sorted(folder.glob("*.png"))
    if not files:
        sys.exit(f"serve_bench: no PNG images in {folder}; pass --images DIR with some 32x32 PNGs")
    return [(f.name, f.read_bytes()) for f in files]


# -- servers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launcher:
    """Starts the servers under test (``bench/harness.py``): loopback, a free port each, logs in ``workdir``."""

    workdir: Path
    start_timeout_s: float

    def camserve(self, name: str, model_dir: Path, **settings: str | int) -> contextlib.AbstractContextManager[Server]:
        """``python -m service``, request logging off, plus any ``CAMSERVE_*`` overrides."""
        log_path = self.workdir / f"{name}.log"
        return harness.camserve(
            model_dir,
            log_path,
            name=name,
            start_timeout_s=self.start_timeout_s,
            quiet=False,
            **{"log_requests": "false", **settings},
        )

    def litserve(
        self, model_dir: Path, precision: str, runtime: str | None = None
    ) -> contextlib.AbstractContextManager[Server]:
        """``bench/litserve_server.py`` with the issue's batching: up to 32 images, 5 ms timeout; on
        ``runtime`` (torch, openvino; None: the peer's default for the precision)."""
        port = free_port()
        command = [sys.executable, str(ROOT / "bench" / "litserve_server.py"), "--model-dir", str(model_dir)]
        command += ["--port", str(port), "--precision", precision]
        command += ["--runtime", runtime] if runtime else []
        command += ["--max-batch-size", str(LITSERVE["max_batch_size"])]
        command += ["--batch-timeout", str(LITSERVE["batch_timeout_s"])]
        command += ["--workers", str(LITSERVE["workers_per_device"])]
        log_path = self.workdir / "litserve.log"
        return harness.serving(
            "litserve",
            command,
            server_env(),
            port,
            log_path,
            ready_path="/health",
            start_timeout_s=self.start_timeout_s,
            quiet=False,
        )


# -- measuring a server ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    hey: str
    duration_s: float
    warmup_s: float
    concurrency: list[int]
    bulk_concurrency: int


def check_answer(server: Server, endpoint: str, body: Body) -> None:
    """Benchmarking a server that answers 4xx would measure its error path: refuse to."""
    status, payload = request("POST", server.base_url + endpoint, body)
    key = "results" if endpoint == "/gradcam" else "predictions"
    if status != 200:
        raise RuntimeError(
            f"[{server.name}] {endpoint} answered {status}: {payload[:500]!r}; "
            f"its log ends:\n{log_tail(server.log_path)}"
        )
    rows = json.loads(payload).get(key, [])
    if len(rows) != body.images:
        raise RuntimeError(f"[{server.name}] {endpoint}: {len(rows)} {key} for {body.images} images")


def sweep(plan: Plan, server: Server, target: str, endpoint: str, body: Body, concurrencies: list[int]) -> list[Point]:
    """Warm up, then time, each concurrency in turn; prints one line per point as it lands."""
    check_answer(server, endpoint, body)
    url = server.base_url + endpoint
    points = []
    for concurrency in concurrencies:
        if plan.warmup_s > 0:
            run_hey(plan.hey, url, body, concurrency=concurrency, seconds=plan.warmup_s)
        parsed = run_hey(plan.hey, url, body, concurrency=concurrency, seconds=plan.duration_s)
        point = hey_point(target, endpoint, body.images, concurrency, parsed)
        print(format_point(point), flush=True)
        points.append(point)
    return points


def format_point(point: Point) -> str:
    def ms(value: float | None) -> str:
        return f"{value:7.1f}" if value is not None else "    n/a"

    where = f"c={point.concurrency}" if point.concurrency is not None else f"batch {point.images_per_request}"
    line = (
        f"  {point.target:<10} {point.endpoint:<10} {where:<9} {point.images_per_s:8.1f} img/s"
        f"  p50 {ms(point.p50_ms)}  p95 {ms(point.p95_ms)}  p99 {ms(point.p99_ms)} ms"
    )
    if point.non_200 or point.errors:
        line += f"  NON-200 {point.non_200} {point.status_codes}  ERRORS {point.errors} {point.error_messages[:1]}"
    return line


# -- the in-process ceiling -----------------------------------------------------------------------
def ceiling(
    model_dir: Path, precision: str, images: list[tuple[str, bytes]], sizes: list[int], seconds: float
) -> list[Point]:
    """The model alone, through the one forward recipe the server's engine runs (uint8 in, the
    served precision, no TTA, probabilities back on the CPU) on batches decoded once up front: no
    HTTP, no decoding, no queue. One point per batch size."""
    bundle = load_bundle(model_dir)
    device = resolve_device("auto")
    bundle.model.to(device=device, memory_format=torch.channels_last)
    forward = ServedForward.from_bundle(bundle, precision=precision).eval()
    decoded = [decode_image(data, name, max_pixels=25_000_000) for name, data in images]
    points = []
    for size in sizes:
        batch = torch.stack([decoded[i % len(decoded)] for i in range(size)])

        @torch.inference_mode()
        def step(batch: torch.Tensor = batch) -> None:
            forward(batch.to(device, non_blocking=True)).cpu()  # .cpu() waits for the GPU, as the server does

        timed_loop(step, min(1.0, seconds))  # warm-up: kernel selection, allocator growth
        points.append(latency_point("ceiling", "in-process", size, timed_loop(step, seconds)))
    return points


def latency_point(target: str, endpoint: str, images: int, latencies: list[float]) -> Point:
    total = sum(latencies)
    quantile = percentile_fn(latencies)
    return Point(
        target=target,
        endpoint=endpoint,
        concurrency=None,
        images_per_request=images,
        images_per_s=images * len(latencies) / total,
        requests_per_s=len(latencies) / total,
        p50_ms=quantile(50) * 1000,
        p95_ms=quantile(95) * 1000,
        p99_ms=quantile(99) * 1000,
        responses=len(latencies),
        non_200=0,
        errors=0,
        duration_s=total,
    )


def timed_loop(step: Callable[[], None], seconds: float) -> list[float]:
    """Per-call wall times of ``step`` for ``seconds`` (at least 3 calls)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(latencies) < 3:
        started = time.perf_counter()
        step()
        latencies.append(time.perf_counter() - started)
    return latencies


def percentile_fn(values: list[float]) -> Callable[[float], float]:
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return at


# -- the run ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="bundle (default: %(default)s)")
    parser.add_argument("--images", type=Path, help="folder of PNGs to send (default: the bundle's misclassified/)")
    parser.add_argument("--precision", choices=["auto", *AUTOCAST_DTYPES], default="auto")
    parser.add_argument("--duration", type=float, help="seconds per point (default 10; 2 with --quick)")
    parser.add_argument("--warmup", type=float, help="seconds of discarded load before each point (default 2)")
    parser.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], help="default 1,8,32,128")
    parser.add_argument(
        "--tta",
        choices=["none", "flip"],
        default="none",
        help="camserve's test-time augmentation (default none: the same network work as LitServe and the "
        "ceiling; the camserve_tta target measures flip)",
    )
    parser.add_argument("--bulk-images", type=int, default=32, help="images per bulk request")
    parser.add_argument("--bulk-concurrency", type=int, default=8)
    parser.add_argument("--ceiling-seconds", type=float, help="timed seconds per ceiling batch size (default 5)")
    parser.add_argument("--skip", action="append", default=[], choices=["gradcam", "bulk", *TARGETS[1:]])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per point, c=1,8; *_quick.* files")
    parser.add_argument("--hey", default="hey", help="hey binary")
    parser.add_argument("--start-timeout", type=float, default=DEFAULT_START_TIMEOUT_S, help="seconds per server")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.duration = args.duration or (2.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 2.0)
    args.concurrency = args.concurrency or ([1, 8] if quick else [1, 8, 32, 128])
    args.ceiling_seconds = args.ceiling_seconds or (1.0 if quick else 5.0)
    args.images = args.images or args.model_dir / "misclassified"
    return args


def bench_camserve(
    args: argparse.Namespace, plan: Plan, bodies: dict[str, Body], launcher: Launcher
) -> tuple[list[Point], dict]:
    """The server as shipped: /predict, /gradcam, bulk. Returns its points and its /health."""
    settings: dict[str, str] = {"tta": args.tta}
    if args.precision != "auto":
        settings["precision"] = args.precision
    with launcher.camserve("camserve", args.model_dir, **settings) as server:
        health = json.loads(request("GET", server.base_url + "/health")[1])
        print(f"[camserve] {health['device']}, precision {health['precision']}: {health['precision_reason']}")
        points = sweep(plan, server, "camserve", "/predict", bodies["single"], plan.concurrency)
        if "gradcam" not in args.skip:
            points += sweep(plan, server, "camserve", "/gradcam", bodies["single"], plan.concurrency)
        if "bulk" not in args.skip:
            points += sweep(plan, server, "camserve", "/predict", bodies["bulk"], [plan.bulk_concurrency])
    return points, health


def measure(args: argparse.Namespace, images: list[tuple[str, bytes]], workdir: Path) -> tuple[list[Point], dict]:
    """Every target in turn, one server at a time, so none competes with another for the cores."""
    plan = Plan(require_hey(args.hey), args.duration, args.warmup, args.concurrency, args.bulk_concurrency)
    bulk = [images[i % len(images)] for i in range(args.bulk_images)]
    bodies = {
        "single": multipart_body(images[:1], workdir / "single.body"),
        "bulk": multipart_body(
            [(f"bulk-{i:02d}-{name}", data) for i, (name, data) in enumerate(bulk)], workdir / "bulk.body"
        ),
    }
    launcher = Launcher(workdir, args.start_timeout)
    points, health = bench_camserve(args, plan, bodies, launcher)
    precision = health["precision"]  # every other target runs at the precision camserve chose
    if "unbatched" not in args.skip:
        unbatched = {"precision": precision, "tta": args.tta, "max_batch_size": 1}
        with launcher.camserve("unbatched", args.model_dir, **unbatched) as server:
            points += sweep(plan, server, "unbatched", "/predict", bodies["single"], plan.concurrency)
    if "unbatched_1lane" not in args.skip:  # the classic unbatched server: one request at a time
        one_lane = {"precision": precision, "tta": args.tta, "max_batch_size": 1, "model_lanes": 1}
        with launcher.camserve("unbatched_1lane", args.model_dir, **one_lane) as server:
            points += sweep(plan, server, "unbatched_1lane", "/predict", bodies["single"], plan.concurrency)
    if "camserve_tta" not in args.skip and args.tta == "none":  # what flip TTA's second view costs
        with launcher.camserve("camserve_tta", args.model_dir, precision=precision, tta="flip") as server:
            points += sweep(plan, server, "camserve_tta", "/predict", bodies["single"], plan.concurrency)
    if "litserve" not in args.skip:
        with launcher.litserve(args.model_dir, precision) as server:
            points += sweep(plan, server, "litserve", "/predict", bodies["single"], plan.concurrency)
    if "ceiling" not in args.skip:
        print(f"[ceiling] in process, {precision}, {args.ceiling_seconds:g} s per batch size", flush=True)
        for point in ceiling(args.model_dir, precision, images, [args.bulk_images, 1], args.ceiling_seconds):
            print(format_point(point), flush=True)
            points.append(point)
    return points, health


def run(args: argparse.Namespace) -> dict:
    """Check the tools, measure, and return the whole record that the reports are made from."""
    require_hey(args.hey)
    if "litserve" not in args.skip:
        require_litserve()
    images = load_images(args.images)
    started = dt.datetime.now(dt.UTC)
    machine = machine_info()  # before any server starts: the load average says who else was busy
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        points, health = measure(args, images, Path(tmp))
    return {
        "benchmark": "serve_bench",
        "quick": args.quick,
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.orig_argv),
        "machine": machine,
        "versions": versions(),
        "device": health["device"],
        "precision": health["precision"],
        "precision_reason": health["precision_reason"],
        "tta": health.get("test_time_augmentation"),
        "batching": health["batching"],
        "model": {key: health["model"].get(key) for key in ("name", "version", "test_accuracy")},
        "camserve_env": {k: v for k, v in server_env().items() if k.startswith("CAMSERVE_")},
        "litserve": LITSERVE if "litserve" not in args.skip else None,
        "settings": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "concurrency": args.concurrency,
            "bulk_images": args.bulk_images,
            "bulk_concurrency": args.bulk_concurrency,
            "ceiling_seconds": args.ceiling_seconds,
            "hey_request_timeout_s": HEY_REQUEST_TIMEOUT_S,
            "images": [name for name, _ in images],
        },
        "points": [asdict(point) for point in points],
    }


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM becomes SystemExit, so the ``finally`` blocks stop the servers (they have their own sessions)."""
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    result = run(args)
    paths = write_reports(result, args.out_dir, "serve_bench_quick" if args.quick else "serve_bench")
    print()
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(path) for path in paths.values()))


if __name__ == "__main__":
    main()

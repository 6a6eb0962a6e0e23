"""How far issue 16's CPU targets are from what this stack can do on this machine, measured.

Issue 16 asks, on the 2-core machine, for single-image ``/predict`` at c=32 to reach 0.73 of the bare
model's batch-32 throughput, and for the server's CPU per image to stay within the bare model's CPU
per image + 250 us. On 2 cores the load client runs beside the server, so every request's CPU
(model + HTTP front + hey) comes out of the same two cores:

    throughput <= cores / (model + front + client)   and   ceiling = cores / model
    => ratio    <= model / (model + front + client)

This script measures each term in one run:

* **model**: the bare model through the one forward recipe (``ServedForward``), batch 32, at the
  served precision, no TTA: CPU microseconds per image (process time) and images/s;
* **front floor**: the CPU per request of ASGI apps that do only part of camserve's work
  (``bench/floor_apps.py``: a bare ASGI callable, Starlette, FastAPI, + multipart, + a Pillow decode),
  served by uvicorn (httptools) in one process, driven by ``hey`` at c=32 with a 32x32 PNG upload;
* **camserve's front**: the same load on ``python -m service`` with the null engine (no model),
  multipart and raw bodies;
* **client**: ``hey``'s own CPU per request (``getrusage`` of the child), measured in the same runs.

    flock -x /tmp/camserve-cpu.lock .venv/bin/python bench/http_floor.py

Writes ``bench/results/http_floor.json`` and ``bench/results/http_floor.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the service package, from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from c32_ratio import Ceiling
from floor_apps import APPS
from front_bench import REPO, cifar_png, server, upload
from harness import (
    Body,
    cpu_model,
    free_port,
    process_cpu_seconds,
    raw_body,
    require_hey,
    run_hey,
    server_env,
    server_pids,
    serving,
)

from service.decoding.probe import decode_image

RESULTS = REPO / "bench" / "results"
TARGET_EXTRA_US = 250  # issue 16: server CPU per image <= the bare model's + 250 us
TARGET_RATIO = 0.73  # issue 16: /predict c=32 >= 0.73 x the bare model's batch-32 throughput


def model_cost(model_dir: Path, precision: str, seconds: float) -> dict:
    """The bare model at batch 32: images/s and CPU microseconds per image (all of torch's threads)."""
    ceiling = Ceiling(model_dir, precision, decode_image(cifar_png(), "a.png", max_pixels=1 << 20))
    measured = ceiling.measure(seconds)
    return {
        "precision": precision,
        "torch_threads": torch.get_num_threads(),
        "images_per_s": round(measured["images_per_s"], 1),
        "cpu_us_per_image": round(measured["cpu_us_per_image"], 1),
    }


def run_load(hey: str, url: str, body: Body, concurrency: int, seconds: float, pids: list[int]) -> dict:
    """hey against ``url``; CPU per answered request of the server's processes and of hey itself."""
    before = {pid: process_cpu_seconds(pid) for pid in pids}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    parsed = run_hey(hey, url, body, concurrency=concurrency, seconds=seconds, request_timeout_s=30)
    elapsed = time.perf_counter() - started
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = sum(process_cpu_seconds(pid) - before[pid] for pid in pids)
    client_cpu = (after_children.ru_utime - children.ru_utime) + (after_children.ru_stime - children.ru_stime)
    ok = parsed["status_codes"].get("200", 0)
    if not ok or set(parsed["status_codes"]) - {"200"}:
        raise RuntimeError(f"unexpected answers from {url}: {parsed['status_codes']} {parsed['errors'][:2]}")
    return {
        "requests_ok": ok,
        "req_per_s": round(ok / elapsed, 1),
        "server_cpu_us_per_request": round(server_cpu * 1e6 / ok),
        "client_cpu_us_per_request": round(client_cpu * 1e6 / ok),
    }


def floor_app(hey: str, app: str, body: Body, args: argparse.Namespace, scratch: Path) -> dict:
    """One of bench/floor_apps.py under uvicorn (httptools, one process); ready once it accepts connections."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", f"floor_apps:{app}", "--app-dir", str(REPO / "bench")]
    command += ["--host", "127.0.0.1", "--port", str(port), "--http", "httptools", "--no-access-log"]
    command += ["--log-level", "warning"]
    with serving(app, command, server_env(), port, scratch / f"{app}.log", ready_path=None, start_timeout_s=60) as up:
        url = f"{up.base_url}/predict"
        run_load(hey, url, body, args.concurrency, 1.0, [up.pid])  # warm-up
        return run_load(hey, url, body, args.concurrency, args.seconds, [up.pid])


def camserve_front(hey: str, kind: str, body: Body, args: argparse.Namespace, scratch: Path) -> dict:
    with server(1, {"engine": "null", "tta": "none"}, scratch / f"camserve-{kind}.log") as running:
        pids = server_pids(running.pid)
        run_load(hey, running.base_url + "/predict", body, args.concurrency, 1.0, pids)
        return run_load(hey, running.base_url + "/predict", body, args.concurrency, args.seconds, pids)


def bound(model_us: float, front_us: float, client_us: float) -> float:
    """The best c=32 ratio to the ceiling that these per-request CPU costs allow on cores shared with hey."""
    return model_us / (model_us + front_us + client_us)


def report(result: dict) -> str:
    model = result["model"]
    m = model["cpu_us_per_image"]
    lines = [
        "# The HTTP front's floor against issue 16's CPU targets",
        "",
        f"{result['when']} · {result['cpu']} · {result['cores']} cores · torch {result['torch']} · "
        f"hey c={result['concurrency']}, {result['seconds']:g} s per row after 1 s of warm-up, "
        "one 32x32 PNG per request (multipart unless the row says raw)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"**Bare model**, batch 32, {model['precision']}, {model['torch_threads']} torch threads: "
        f"{model['images_per_s']:g} images/s, **{m:g} us of CPU per image**. Issue 16 allows the server "
        f"{m + TARGET_EXTRA_US:g} us per image (model + {TARGET_EXTRA_US} us) and asks for "
        f"{TARGET_RATIO:.2f} of the ceiling at c=32.",
        "",
        "| server (1 process) | req/s | server CPU us/request | hey CPU us/request | "
        "front within model + 250 us? | best c=32 ratio on these 2 cores |",
        "|---|---:|---:|---:|:---:|---:|",
    ]
    for name, row in result["rows"].items():
        front, client = row["server_cpu_us_per_request"], row["client_cpu_us_per_request"]
        ok = "yes" if front <= TARGET_EXTRA_US else "no"
        lines.append(f"| {name} | {row['req_per_s']:g} | {front} | {client} | {ok} | {bound(m, front, client):.2f} |")
    lines += [
        "",
        "The last column is `model / (model + front + hey)`: what the two cores allow if the model ran at its "
        "batch-32 efficiency and nothing waited. It is an upper bound: the measured c=32 ratio "
        "(bench/results/serve_bench.md) is lower because batches at c=32 are smaller than 32 and the stages "
        "do not overlap perfectly.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--model-seconds", type=float, default=5.0)
    parser.add_argument("--output", type=Path, default=RESULTS / "http_floor.json")
    args = parser.parse_args()
    hey = require_hey()
    with tempfile.TemporaryDirectory(prefix="http-floor-") as tmp:
        scratch = Path(tmp)
        png = cifar_png()
        multipart = upload("a.png", png, scratch / "mp.bin")
        raw = raw_body(png, "image/png", scratch / "raw.bin")
        rows: dict[str, dict] = {}
        for app in APPS:
            print(f"[floor] {app}", flush=True)
            rows[app] = floor_app(hey, app, multipart, args, scratch)
        for kind, body in (("multipart", multipart), ("raw", raw)):
            print(f"[camserve] null engine, {kind}", flush=True)
            rows[f"camserve, null engine, {kind}"] = camserve_front(hey, kind, body, args, scratch)
    print("[model] batch 32", flush=True)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "command": "flock -x /tmp/camserve-cpu.lock .venv/bin/python bench/http_floor.py",
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "model": model_cost(args.model_dir, args.precision, args.model_seconds),
        "rows": rows,
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    markdown = report(result)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

"""The HTTP front's capacity and CPU per request, for N workers, multipart and raw bodies.

Starts ``python -m service`` (by default with ``CAMSERVE_ENGINE=null``: answers of the right shape,
no network, so what is measured is the front alone), drives it with ``hey`` for a few seconds per
point on loopback, and reads utime+stime of every server process (the supervisor and its workers)
from ``/proc/<pid>/stat`` before and after: CPU microseconds per request, per process and in all.

    flock -x /tmp/camserve-cpu.lock python bench/front_bench.py --workers 1 2 --seconds 5

Writes ``bench/results/front_bench.json`` and prints a Markdown table; ``bench/results/workers.md``
holds the runs and what they mean.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the kit and fixtures, also under `python -m`
from fixtures import encode, random_image
from harness import (
    Body,
    camserve,
    cpu_model,
    metric,
    multipart_body,
    process_cpu_seconds,
    raw_body,
    require_hey,
    run_hey,
    scrape,
    server_pids,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BOUNDARY = "camservebenchboundary"


def cifar_png() -> bytes:
    """A 32x32 noise PNG (seed 0): the size of image the network takes, so no resize is measured."""
    return encode(random_image(0))


def photo_jpeg(quality: int = 85) -> bytes:
    """A 1600x1200 JPEG as a phone sends: smooth gradients plus noise (not a flat image); 0.80 MB at the
    default quality (this benchmark's photo since issue 16), 1.02 MB at 90."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:1200, 0:1600]
    base = np.stack([(x * 255 / 1600), (y * 255 / 1200), ((x + y) * 255 / 2800)], -1)
    pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def upload(name: str, data: bytes, path: Path | None = None) -> Body:
    """One file under ``files``, as the front benchmarks have always sent it (fixed boundary, octet-stream)."""
    return multipart_body([(name, data)], path, boundary=BOUNDARY, part_type="application/octet-stream")


def process_name(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return "resource_tracker" if "resource_tracker" in command else "worker" if "multiprocessing" in command else "main"


def server(workers: int, settings: dict[str, str], log: Path):
    """``python -m service`` with ``workers`` processes, every one ready; request logs off."""
    return camserve(None, log, workers=workers, log_requests="false", log_level="warning", **settings)


def hey_run(hey: str, url: str, body: Body, concurrency: int, seconds: float) -> dict:
    parsed = run_hey(hey, url, body, concurrency=concurrency, seconds=seconds)
    latency = {
        f"p{p}_ms": parsed["percentiles_s"][p] * 1000 if p in parsed["percentiles_s"] else None for p in (50, 99)
    }
    return {"codes": {int(code): n for code, n in parsed["status_codes"].items()}, **latency}


def batch_totals(base: str, endpoint: str) -> tuple[float, float]:
    """(images, batches) run so far for the endpoint, over every worker (one scrape)."""
    samples = scrape(base)
    return (
        metric(samples, "camserve_batch_size_sum", endpoint=endpoint),
        metric(samples, "camserve_batch_size_count", endpoint=endpoint),
    )


def measure(hey: str, base: str, root: int, url_path: str, body: Body, args) -> dict:
    pids = server_pids(root)
    images_before, batches_before = batch_totals(base, args.endpoint)
    before = {pid: process_cpu_seconds(pid) for pid in pids}
    started = time.perf_counter()
    result = hey_run(hey, base + url_path, body, args.concurrency, args.seconds)
    elapsed = time.perf_counter() - started
    after = {pid: process_cpu_seconds(pid) for pid in pids}
    images_after, batches_after = batch_totals(base, args.endpoint)
    ok = result["codes"].get(200, 0)
    per_process = {f"{process_name(pid)}:{pid}": round((after[pid] - before[pid]) * 1e6 / max(ok, 1)) for pid in pids}
    return {
        "requests_ok": ok,
        "codes": result["codes"],
        "req_per_s": round(ok / elapsed, 1),
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "mean_batch": round((images_after - images_before) / max(batches_after - batches_before, 1), 2),
        "cpu_us_per_request": round(sum(after[p] - before[p] for p in pids) * 1e6 / max(ok, 1)),
        "cpu_us_per_request_by_process": per_process,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engine", choices=["null", "torch"], default="null")
    parser.add_argument("--null-batch-ms", type=float, default=0.0, help="null engine: sleep per batch")
    parser.add_argument("--bodies", nargs="+", default=["multipart", "raw"], choices=["multipart", "raw", "photo"])
    parser.add_argument("--endpoint", default="/predict")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tta", default="none")
    parser.add_argument("--label", default="", help="name of this run in the results file")
    parser.add_argument("--output", type=Path, default=RESULTS / "front_bench.json")
    args = parser.parse_args()

    hey = require_hey()
    scratch = Path(tempfile.mkdtemp(prefix="front-bench-"))
    small, photo = cifar_png(), photo_jpeg()
    payloads = {
        "multipart": upload("cifar.png", small, scratch / "multipart.bin"),
        "raw": raw_body(small, "image/png", scratch / "raw.bin"),
        "photo": raw_body(photo, "image/jpeg", scratch / "photo.bin"),  # the photo's bytes dominate either way
    }
    settings = {"engine": args.engine, "null_batch_ms": str(args.null_batch_ms), "tta": args.tta}
    rows = []
    for workers in args.workers:
        with server(workers, settings, scratch / f"server-{workers}.log") as running:
            for name in args.bodies:
                body = payloads[name]
                hey_run(hey, running.base_url + args.endpoint, body, args.concurrency, 1.0)  # warm the connections
                row = {"workers": workers, "body": name, "body_bytes": len(body.data)}
                row |= measure(hey, running.base_url, running.pid, args.endpoint, body, args)
                rows.append(row)
                print(json.dumps(row), flush=True)

    record = {
        "label": args.label,
        "machine": f"{platform.node()}: {cpu_model()}, {len(os.sched_getaffinity(0))} cores",
        "command": "python bench/front_bench.py " + " ".join(sys.argv[1:]),
        "engine": args.engine,
        "null_batch_ms": args.null_batch_ms,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "tta": args.tta,
        "rows": rows,
    }
    history = json.loads(args.output.read_text()) if args.output.exists() else []
    history = [run for run in history if run.get("label") != args.label or not args.label] + [record]
    args.output.write_text(json.dumps(history, indent=1) + "\n")
    print()
    print("| workers | body | req/s | p50 ms | p99 ms | mean batch | CPU us/request (all) | by process |")
    print("|---:|---|---:|---:|---:|---:|---:|---|")
    for row in rows:
        by = ", ".join(f"{k.split(':')[0]} {v}" for k, v in row["cpu_us_per_request_by_process"].items())
        print(
            f"| {row['workers']} | {row['body']} | {row['req_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
            f"| {row['mean_batch']} | {row['cpu_us_per_request']} | {by} |"
        )


if __name__ == "__main__":
    main()

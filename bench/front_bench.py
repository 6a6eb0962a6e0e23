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
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TICKS = os.sysconf("SC_CLK_TCK")
BOUNDARY = "camservebenchboundary"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cifar_png() -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def photo_jpeg() -> bytes:
    """A 1600x1200 JPEG of about 1 MB, as a phone sends: smooth gradients plus noise (not a flat image)."""
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:1200, 0:1600]
    base = np.stack([(x * 255 / 1600), (y * 255 / 1200), ((x + y) * 255 / 2800)], -1)
    pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def multipart(name: str, data: bytes) -> bytes:
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{name}"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def server_pids(root: int) -> list[int]:
    """The started process and its descendants (uvicorn's workers; not multiprocessing's tracker)."""
    pids, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                pids.append(int(child))
                frontier.append(int(child))
    return pids


def process_name(pid: int) -> str:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    return "resource_tracker" if "resource_tracker" in command else "worker" if "multiprocessing" in command else "main"


@contextmanager
def server(workers: int, env_extra: dict[str, str], log: Path):
    port = free_port()
    env = {
        **os.environ,
        "CAMSERVE_HOST": "127.0.0.1",
        "CAMSERVE_PORT": str(port),
        "CAMSERVE_WORKERS": str(workers),
        "CAMSERVE_LOG_REQUESTS": "false",
        "CAMSERVE_LOG_LEVEL": "warning",
        **env_extra,
    }
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "service"], env=env, cwd=REPO, stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=5).json()["workers"]["ready"] == workers:
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.3)
        else:
            raise TimeoutError("server not ready")
        yield base, process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_hey(url: str, body: Path, content_type: str, concurrency: int, seconds: float) -> dict:
    command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-T", content_type]
    command += ["-D", str(body), url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    latency = {}
    for pct in ("50", "99"):
        match = re.search(rf"{pct}%+ in ([\d.]+) secs", out)
        latency[f"p{pct}_ms"] = float(match.group(1)) * 1000 if match else None
    return {"codes": codes, **latency}


def batch_totals(base: str, endpoint: str) -> tuple[float, float]:
    """(images, batches) run so far for the endpoint, over every worker (one scrape)."""
    sums = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        for name in ("camserve_batch_size_sum", "camserve_batch_size_count"):
            if line.startswith(name + "{") and f'endpoint="{endpoint}"' in line:
                sums[name] = float(line.rsplit(" ", 1)[1])
    return sums.get("camserve_batch_size_sum", 0.0), sums.get("camserve_batch_size_count", 0.0)


def measure(base: str, root: int, url_path: str, body: Path, content_type: str, args) -> dict:
    pids = server_pids(root)
    images_before, batches_before = batch_totals(base, args.endpoint)
    before = {pid: cpu_seconds(pid) for pid in pids}
    started = time.perf_counter()
    hey = run_hey(base + url_path, body, content_type, args.concurrency, args.seconds)
    elapsed = time.perf_counter() - started
    after = {pid: cpu_seconds(pid) for pid in pids}
    images_after, batches_after = batch_totals(base, args.endpoint)
    ok = hey["codes"].get(200, 0)
    per_process = {f"{process_name(pid)}:{pid}": round((after[pid] - before[pid]) * 1e6 / max(ok, 1)) for pid in pids}
    return {
        "requests_ok": ok,
        "codes": hey["codes"],
        "req_per_s": round(ok / elapsed, 1),
        "p50_ms": hey["p50_ms"],
        "p99_ms": hey["p99_ms"],
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

    scratch = Path(tempfile.mkdtemp(prefix="front-bench-"))
    small, photo = cifar_png(), photo_jpeg()
    payloads = {
        "multipart": (multipart("cifar.png", small), f"multipart/form-data; boundary={BOUNDARY}"),
        "raw": (small, "image/png"),
        "photo": (photo, "image/jpeg"),  # raw body: the photo's bytes dominate either way
    }
    env = {"CAMSERVE_ENGINE": args.engine, "CAMSERVE_NULL_BATCH_MS": str(args.null_batch_ms), "CAMSERVE_TTA": args.tta}
    rows = []
    for workers in args.workers:
        with server(workers, env, scratch / f"server-{workers}.log") as (base, process):
            for name in args.bodies:
                data, content_type = payloads[name]
                body = scratch / f"{name}.bin"
                body.write_bytes(data)
                run_hey(base + args.endpoint, body, content_type, args.concurrency, 1.0)  # warm the connections
                row = {"workers": workers, "body": name, "body_bytes": len(data)}
                row |= measure(base, process.pid, args.endpoint, body, content_type, args)
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


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()

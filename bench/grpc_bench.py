"""The Open Inference Protocol over gRPC beside REST: the same single-image infer, one camserve server,
``tritonclient.grpc`` against ``tritonclient.http`` (binary tensors both ways, as tritonclient sends by
default), closed-loop clients at a few concurrencies.

The clients are Python threads on the same machine (a Go load generator such as ``hey`` speaks no
gRPC), so on 2 cores they compete with the server: the figures compare the two transports under the
same handicap, not camserve's capacity (bench/serve_bench.py measures that, with hey). Each point is
a warm-up (discarded), then a timed run; the server listens on loopback only and is always stopped.

    python bench/grpc_bench.py [--model-dir models/cifar10-resnet] [--seconds 10] [--concurrency 1 8]
    python bench/grpc_bench.py --engine null      # the fronts alone: no network runs

Writes bench/results/grpc_bench.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from harness import camserve, cpu_model, free_port  # noqa: E402

IMAGE = ROOT / "service" / "static" / "examples" / "cat.png"


def client_for(transport: str, http_url: str, grpc_url: str):
    if transport == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(grpc_url)
    import tritonclient.http as module

    return module, module.InferenceServerClient(http_url, concurrency=1, network_timeout=60)


def run_point(transport: str, http_url: str, grpc_url: str, model: str, concurrency: int, seconds: float) -> dict:
    """``concurrency`` threads, each with its own client, sending one request after another for ``seconds``."""
    data = np.array([IMAGE.read_bytes()], dtype=np.object_)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def worker() -> None:
        module, client = client_for(transport, http_url, grpc_url)
        tensor = module.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(data)
        mine = []
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                client.infer(model, [tensor])
            except Exception:
                with lock:
                    errors[0] += 1
                continue
            mine.append(time.perf_counter() - started)
        client.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 120)
    elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "transport": transport,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors[0],
        "rps": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
        "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "cifar10-resnet")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--engine", choices=["torch", "null"], default="torch")
    parser.add_argument("--note", default="", help="a line about the machine's load, for the results")
    args = parser.parse_args()
    model = json.loads((args.model_dir / "model.json").read_text())["name"]
    grpc_port = free_port()
    log = ROOT / "bench" / "results" / "grpc_bench_server.log"
    settings = {"grpc_port": grpc_port, "precision": "fp32", "log_requests": "false", "engine": args.engine}
    points = []
    with camserve(args.model_dir, log, **settings) as server:
        http_url = server.base_url.removeprefix("http://")
        grpc_url = f"127.0.0.1:{grpc_port}"
        for concurrency in args.concurrency:
            for transport in ("http", "grpc"):
                run_point(transport, http_url, grpc_url, model, concurrency, min(2.0, args.seconds))  # warm-up
                point = run_point(transport, http_url, grpc_url, model, concurrency, args.seconds)
                print(json.dumps(point), flush=True)
                points.append(point)
    log.unlink(missing_ok=True)
    command = shlex.join(["python", "bench/grpc_bench.py", *sys.argv[1:]])
    results = {"command": command, "machine": cpu_model(), "engine": args.engine, "note": args.note, "points": points}
    out = ROOT / "bench" / "results"
    (out / "grpc_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        f"| {p['concurrency']} | {'gRPC' if p['transport'] == 'grpc' else 'REST'} | {p['rps']:.0f} | "
        f"{p['p50_ms']:.1f} | {p['p99_ms']:.1f} | {p['errors']} |"
        for p in points
    ]
    lines = [
        "# The Open Inference Protocol: gRPC beside REST",
        "",
        f"Command: `{command}`  ",
        f"Machine: {cpu_model()}; engine `{args.engine}`, fp32; each client sends one single-image `image` (BYTES)"
        " request at a time  ",
        *([f"Load: {args.note}  "] if args.note else []),
        "",
        "Clients: tritonclient.http (binary tensors) and tritonclient.grpc, Python threads on the same machine",
        "as the server, so the figures compare the transports under the same handicap (bench/grpc_bench.py).",
        "",
        "| concurrency | transport | req/s | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]
    (out / "grpc_bench.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

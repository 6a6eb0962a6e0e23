"""The model alone per runtime and precision, and the served /predict on each runtime, side by side in one run.

Part 1, the model alone: the one forward recipe (``CAMSERVE_TTA=none``) on pre-made uint8 batches of
1, 8, 32 and 128 images, torch traced (fp32, bf16) as the torch engine runs it, and OpenVINO (fp32,
bf16, int8: the shipped bundle's quantized network) as the OpenVINO engine compiles it. Each runs in
its own process (torch's OpenMP and OpenVINO's TBB workers in one process disturb each other), all
started once and idle while another measures; rounds alternate through every configuration, and each
figure is the median over rounds. Lanes: ``1`` = one caller, all threads; ``2`` = two callers at once
(the service's two model lanes): torch with one intra-op thread each, OpenVINO with two streams.

Part 2, the served /predict: ``python -m service`` on torch (its own auto precision, as before),
on OpenVINO (auto: int8 for this bundle) with the service's two lanes, and on OpenVINO with one lane
of two threads (one stream), all running at once and loaded in turn by ``hey`` (32 images a request
at c=1, 4, 32; one image at c=1, 32). Each round's ceilings (torch bf16 at batch 1 and 32, OpenVINO
int8 at batch 32) are measured right before and after it, and ratios use their mean.

    python bench/runtimes.py            # writes bench/results/runtimes.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from front_bench import cpu_model
from harness import camserve, find_hey, multipart_body, request, run_hey
from runtimes_report import load_client, report

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BATCHES = (1, 8, 32, 128)
MODELS = (  # (runtime, precision, lanes)
    ("torch", "fp32", 1),
    ("torch", "bf16", 1),
    ("torch", "bf16", 2),
    ("openvino", "fp32", 1),
    ("openvino", "bf16", 1),
    ("openvino", "int8", 1),
    ("openvino", "fp32", 2),
    ("openvino", "bf16", 2),
    ("openvino", "int8", 2),
)
SERVERS = {  # name -> CAMSERVE_* settings
    "torch": {"runtime": "torch"},
    "openvino": {"runtime": "openvino"},
    "openvino, 1 lane": {"runtime": "openvino", "model_lanes": "1"},
}
POINTS = (("bulk 32", 32, 1), ("bulk 32", 32, 4), ("bulk 32", 32, 32), ("single", 1, 1), ("single", 1, 32))
CEILINGS = (("torch", "bf16", 1, 1), ("torch", "bf16", 1, 32), ("openvino", "int8", 2, 32))


# -- part 1: one model per child process ------------------------------------------------------------
def child(runtime: str, precision: str, lanes: int, model_dir: Path) -> None:
    """Build the model, then answer "batch seconds" lines on stdin with one JSON line of images/s."""
    import numpy as np
    import torch

    from camcore.bundle import load_bundle
    from camcore.forward import ServedForward

    cores = len(os.sched_getaffinity(0))
    bundle = load_bundle(model_dir)
    if runtime == "torch":
        torch.set_num_threads(max(1, cores // lanes))
        forward = ServedForward.from_bundle(bundle, precision=precision).eval()
        with torch.inference_mode():
            traced = torch.jit.trace(forward, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), check_trace=False)

        def make_call():
            def call(batch: np.ndarray) -> None:
                with torch.inference_mode(), torch.jit.optimized_execution(False):
                    traced(torch.from_numpy(batch))

            return call
    else:
        from camcore import openvino_forward as ovf
        from camcore.bundle import quantized_network_path

        int8 = precision == "int8"
        network = ovf.read_network(quantized_network_path(bundle)) if int8 else ovf.convert_network(bundle.model)
        temperature = bundle.metadata["quantized"]["temperature"] if int8 else bundle.temperature
        recipe = ServedForward(bundle.model, bundle.mean, bundle.std, temperature=temperature)
        compiled = ovf.compile_served(ovf.served_model(recipe, network), precision, streams=lanes, threads=cores)

        def make_call():
            request = compiled.create_infer_request()
            return lambda batch: ovf.run(request, batch)

    calls = [make_call() for _ in range(lanes)]
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        size, seconds = int(line.split()[0]), float(line.split()[1])
        batch = np.random.default_rng(0).integers(0, 256, (size, 3, 32, 32), dtype=np.uint8)
        print(json.dumps({"images_per_s": throughput(calls, batch, seconds)}), flush=True)


def throughput(calls: list, batch, seconds: float) -> float:
    """Images/s of every call looping on ``batch`` at once (one thread each) for ``seconds``, at least twice each."""
    for call in calls:
        call(batch)  # this shape's first call pays its one-off costs
    counts = [0] * len(calls)
    started = time.perf_counter()

    def loop(i: int) -> None:
        while time.perf_counter() - started < seconds or counts[i] < 2:
            calls[i](batch)
            counts[i] += 1

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(batch) * sum(counts) / (time.perf_counter() - started)


class Model:
    """A child process holding one (runtime, precision, lanes) model."""

    def __init__(self, key: tuple[str, str, int], model_dir: Path) -> None:
        self.key = key
        command = [sys.executable, __file__, "--child", *map(str, key), "--model-dir", str(model_dir)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert json.loads(self.process.stdout.readline()).get("ready"), f"{key} did not start"

    def measure(self, batch: int, seconds: float) -> float:
        self.process.stdin.write(f"{batch} {seconds}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())["images_per_s"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def model_rounds(models: dict, rounds: int, seconds: float) -> dict[str, list[float]]:
    """Every model at every batch size, each round in a rotated order, so no configuration always runs first."""
    figures: dict[str, list[float]] = {}
    order = list(models)
    for index in range(rounds):
        rotated = order[index % len(order) :] + order[: index % len(order)]
        for batch in BATCHES:
            for key in rotated:
                figures.setdefault(f"{key[0]} {key[1]} x{key[2]} @{batch}", []).append(
                    round(models[key].measure(batch, seconds), 1)
                )
        print(f"model round {index + 1}/{rounds} done", flush=True)
    return figures


# -- part 2: the servers ---------------------------------------------------------------------------
def load_point(hey: str | None, url: str, body, concurrency: int, seconds: float) -> dict:
    result = (
        run_hey(hey, url, body, concurrency=concurrency, seconds=seconds)
        if hey
        else load_client(url, body, concurrency, seconds)
    )
    ok = int(result["status_codes"].get(200, result["status_codes"].get("200", 0)))
    return {
        "images_per_s": round(ok * body.images / result["total_s"], 1),
        "p50_ms": round(1000 * result["percentiles_s"].get(50, float("nan")), 1),
        "non_200": sum(int(n) for code, n in result["status_codes"].items() if int(code) != 200),
    }


def served_rounds(args, models: dict, bodies: dict, workdir: Path) -> tuple[list[dict], dict]:
    hey = find_hey()
    rows: list[dict] = []
    health: dict[str, dict] = {}
    with (
        camserve(args.model_dir, workdir / "torch.log", tta="none", log_requests="false", **SERVERS["torch"]) as t,
        camserve(args.model_dir, workdir / "ov.log", tta="none", log_requests="false", **SERVERS["openvino"]) as o,
        camserve(
            args.model_dir, workdir / "ov1.log", tta="none", log_requests="false", **SERVERS["openvino, 1 lane"]
        ) as o1,
    ):
        servers = {"torch": t, "openvino": o, "openvino, 1 lane": o1}
        for name, server in servers.items():
            body = json.loads(request("GET", server.base_url + "/health")[1])
            health[name] = {k: body[k] for k in ("runtime", "runtime_reason", "precision", "precision_reason")}
            health[name]["lanes"] = body["batching"]["model_lanes"]
            for images in (1, 32):  # warm every path
                load_point(hey, server.base_url + "/predict", bodies[images], 4, 1.0)
        ceiling = {key: models[key[:3]].measure(key[3], args.seconds) for key in CEILINGS}
        for index in range(args.rounds):
            before = ceiling
            round_rows = []
            for label, images, concurrency in POINTS:
                for name, server in servers.items():
                    point = load_point(hey, server.base_url + "/predict", bodies[images], concurrency, args.hey_seconds)
                    round_rows.append({"round": index + 1, "server": name, "point": label, "c": concurrency, **point})
            ceiling = {key: models[key[:3]].measure(key[3], args.seconds) for key in CEILINGS}
            mean = {f"{k[0]} {k[1]} x{k[2]} @{k[3]}": (before[k] + ceiling[k]) / 2 for k in CEILINGS}
            for row in round_rows:
                row["ceilings"] = {k: round(v, 1) for k, v in mean.items()}
            rows += round_rows
            print(f"served round {index + 1}/{args.rounds} done", flush=True)
    return rows, health


def bodies_from(model_dir: Path, workdir: Path) -> dict:
    pngs = sorted((model_dir / "misclassified").glob("*.png"))[:32]
    files = [(path.name, path.read_bytes()) for path in pngs]
    return {
        1: multipart_body(files[:1], workdir / "single.bin"),
        32: multipart_body(files, workdir / "bulk.bin"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--served-rounds", dest="rounds_served", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.5, help="per model measurement")
    parser.add_argument("--hey-seconds", type=float, default=5.0, help="per served point")
    parser.add_argument("--output", type=Path, default=RESULTS / "runtimes.json")
    parser.add_argument("--child", nargs=3, metavar=("RUNTIME", "PRECISION", "LANES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.model_dir)
        return
    load_before = os.getloadavg()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    models = {key: Model(key, args.model_dir) for key in MODELS}
    try:
        model_figures = model_rounds(models, args.rounds, args.seconds)
        for key in [k for k in models if k not in {c[:3] for c in CEILINGS}]:
            models.pop(key).close()  # memory for the servers
        with tempfile.TemporaryDirectory(prefix="runtimes-") as tmp:
            served_args = argparse.Namespace(**{**vars(args), "rounds": args.rounds_served})
            served, health = served_rounds(served_args, models, bodies_from(args.model_dir, Path(tmp)), Path(tmp))
    finally:
        for model in models.values():
            model.close()
    import openvino
    import torch

    record = {
        "when": started,
        "command": " ".join(["python bench/runtimes.py", *sys.argv[1:]]),
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "shared_machine": "other agents' builds and tests were running on the same 2 cores throughout",
        "versions": {
            "torch": torch.__version__,
            "openvino": openvino.get_version(),
            "python": platform.python_version(),
        },
        "hey": bool(find_hey()),
        "model_alone": {name: {"rounds": v, "median": statistics.median(v)} for name, v in model_figures.items()},
        "served": served,
        "served_health": health,
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    markdown = report(record)
    args.output.with_suffix(".md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()

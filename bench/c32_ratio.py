"""Issue 16's two CPU targets, each measured against a ceiling taken right beside it.

`bench/serve_bench.py` measures the in-process ceiling once, minutes after the server's points. On
this project's VMs the model's own speed moves by a third within minutes (four short runs of one
afternoon: a ceiling of 487, 598, 586 and 707 images/s), so one c=32 ratio from it can land
anywhere from 55% to 79%. Here every load point is bracketed: the ceiling is measured, then the
server (started once, idle meanwhile) takes ``hey -c 32``, then the ceiling again, round after round;
each round's ratio is its throughput over the mean of the two ceilings around it.

Targets (issue 16, CPU, this machine, ``CAMSERVE_TTA=none``):

* single-image ``/predict`` at c=32 >= 0.73 x the bare model's batch-32 throughput;
* the server's CPU per image <= the bare model's CPU per image + 250 us (utime + stime of every
  server process over the images answered; the ceiling's process time over its images).

    flock -x /tmp/camserve-cpu.lock .venv/bin/python bench/c32_ratio.py --workers 1 --rounds 5

Appends one record per run to ``bench/results/c32_ratio.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the service package, from a plain checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import camserve, cpu_model, multipart_body, process_cpu_seconds, require_hey, run_hey, server_pids

from camcore.bundle import load_bundle
from camcore.forward import ServedForward
from service.decoding.probe import decode_image

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TARGET_RATIO = 0.73
TARGET_EXTRA_US = 250


class Ceiling:
    """The bare model through the one forward recipe at batch 32, as the serving benchmark's ceiling."""

    def __init__(self, model_dir: Path, precision: str, image: torch.Tensor) -> None:
        bundle = load_bundle(model_dir)
        bundle.model.to(memory_format=torch.channels_last)
        self.forward = ServedForward.from_bundle(bundle, precision=precision).eval()
        self.batch = torch.stack([image] * 32)
        self.measure(1.0)  # kernel selection, allocator growth

    @torch.inference_mode()
    def measure(self, seconds: float) -> dict:
        started, cpu_started, batches = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - started < seconds or batches < 3:
            self.forward(self.batch)
            batches += 1
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        return {"images_per_s": 32 * batches / wall, "cpu_us_per_image": cpu * 1e6 / (32 * batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--workers", default="1", help="CAMSERVE_WORKERS for the server")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=8.0, help="hey seconds per round")
    parser.add_argument("--ceiling-seconds", type=float, default=4.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS / "c32_ratio.json")
    args = parser.parse_args()
    hey = require_hey()
    image_path = sorted((args.model_dir / "misclassified").glob("*.png"))[0]
    data = image_path.read_bytes()
    ceiling = Ceiling(args.model_dir, "bf16", decode_image(data, image_path.name, max_pixels=1 << 20))
    rounds = []
    with tempfile.TemporaryDirectory(prefix="c32-ratio-") as tmp:
        body = multipart_body([(image_path.name, data)], Path(tmp) / "body.bin")
        settings = {"tta": "none", "precision": "bf16", "log_requests": "false", "workers": args.workers}
        with camserve(args.model_dir, Path(tmp) / "server.log", **settings) as server:
            url = server.base_url + "/predict"
            run_hey(hey, url, body, concurrency=args.concurrency, seconds=2)  # warm-up
            pids = server_pids(server.pid)
            before = ceiling.measure(args.ceiling_seconds)
            for index in range(args.rounds):
                cpu_started = sum(process_cpu_seconds(pid) for pid in pids)
                point = run_hey(hey, url, body, concurrency=args.concurrency, seconds=args.seconds)
                server_cpu = sum(process_cpu_seconds(pid) for pid in pids) - cpu_started
                after = ceiling.measure(args.ceiling_seconds)
                ok = point["status_codes"].get("200", 0)
                images_per_s = ok / point["total_s"]
                ceiling_ips = (before["images_per_s"] + after["images_per_s"]) / 2
                ceiling_cpu = (before["cpu_us_per_image"] + after["cpu_us_per_image"]) / 2
                rounds.append(
                    {
                        "round": index + 1,
                        "images_per_s": round(images_per_s, 1),
                        "ceiling_images_per_s": round(ceiling_ips, 1),
                        "ratio": round(images_per_s / ceiling_ips, 3),
                        "server_cpu_us_per_image": round(server_cpu * 1e6 / max(ok, 1)),
                        "ceiling_cpu_us_per_image": round(ceiling_cpu),
                        "non_200": sum(n for code, n in point["status_codes"].items() if int(code) != 200),
                    }
                )
                print(json.dumps(rounds[-1]), flush=True)
                before = after
    record = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "command": " ".join(["bench/c32_ratio.py", *sys.argv[1:]]),
        "workers": args.workers,
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "median_extra_cpu_us_per_image": statistics.median(
            r["server_cpu_us_per_image"] - r["ceiling_cpu_us_per_image"] for r in rounds
        ),
    }
    history = json.loads(args.output.read_text()) if args.output.exists() else []
    args.output.write_text(json.dumps([*history, record], indent=2) + "\n")
    print(report(record))


def report(record: dict) -> str:
    lines = [
        f"{record['when']} · {record['cpu']} · {record['cores']} cores · CAMSERVE_WORKERS={record['workers']} · "
        f"`{record['command']}`",
        "",
        "| round | /predict c=32 img/s | ceiling img/s (mean of the two beside it) | ratio | "
        "server CPU us/image | ceiling CPU us/image | server - ceiling |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["rounds"]:
        extra = r["server_cpu_us_per_image"] - r["ceiling_cpu_us_per_image"]
        lines.append(
            f"| {r['round']} | {r['images_per_s']} | {r['ceiling_images_per_s']} | {r['ratio']:.2f} | "
            f"{r['server_cpu_us_per_image']} | {r['ceiling_cpu_us_per_image']} | {extra} |"
        )
    ratio, extra = record["median_ratio"], record["median_extra_cpu_us_per_image"]
    lines += [
        "",
        f"Median ratio **{ratio:.2f}** (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'not met'}); "
        f"median server CPU per image over the ceiling's **{extra:+.0f} us** (target <= +{TARGET_EXTRA_US}: "
        f"{'met' if extra <= TARGET_EXTRA_US else 'not met'}).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

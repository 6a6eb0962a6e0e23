"""What the CAM methods and the ROAD score cost: ``/gradcam`` under ``hey``, per method, and with
``faithfulness=road``; and the same in process, without HTTP.

One camserve (``python -m service``, its own precision and TTA choice) on loopback; single-image
``/gradcam`` requests from ``hey`` at one concurrency (default 8), each point a discarded warm-up
then a timed run. The methods run in the order gradcam, hirescam, gradcampp, xgradcam, layercam,
gradcam again, so a drift of the machine during the run shows as a gap between the two Grad-CAM
points; every method is compared with their mean. Then ``method=gradcam&faithfulness=road``.
In process: :meth:`TorchEngine.gradcam` on a batch of 16 real images, with and without ROAD,
best of a few runs: the model work per image, which the HTTP figures include under load.

    flock -x /tmp/camserve-cpu.lock .venv/bin/python bench/cam_methods.py            # ~2 minutes
    .venv/bin/python bench/cam_methods.py --duration 3 --warmup 1                       # smoke run

Needs ``hey``. Writes ``bench/results/cam_methods.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
import serve_bench as sb

from camcore.bundle import load_bundle
from camcore.cam_methods import METHODS
from camcore.preprocess import image_to_uint8
from service.inference.jobs import GradcamJob
from service.inference.torch_engine import TorchEngine

RESULTS = sb.RESULTS / "cam_methods"


def hey_gradcam(plan: sb.Plan, server: harness.Server, query: str, body: harness.Body, concurrency: int) -> sb.Point:
    url = f"{server.base_url}/gradcam?{query}"
    status, answer = harness.request("POST", url, body)
    if status != 200:
        raise RuntimeError(f"{url}: {status} {answer[:300]!r}")
    harness.run_hey(plan.hey, url, body, concurrency=concurrency, seconds=plan.warmup_s)
    parsed = harness.run_hey(plan.hey, url, body, concurrency=concurrency, seconds=plan.duration_s)
    point = sb.hey_point("camserve", f"/gradcam?{query}", 1, concurrency, parsed)
    print(sb.format_point(point), flush=True)
    return point


def in_process(model_dir: Path, precision: str, images: list[torch.Tensor], repeats: int) -> dict:
    """Seconds per image of :meth:`TorchEngine.gradcam` on one batch, per method and with ROAD."""
    bundle = load_bundle(model_dir)
    engine = TorchEngine(bundle, torch.device("cpu"), precision, len(images), trace=False, tta="flip")
    layer = bundle.default_cam_layer

    def best(jobs: list[GradcamJob]) -> float:
        engine.gradcam(jobs)  # warm
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            engine.gradcam(jobs)
            times.append(time.perf_counter() - started)
        return min(times) / len(jobs)

    seconds = {method: best([GradcamJob(image, layer, None, method) for image in images]) for method in METHODS}
    seconds["gradcam+road"] = best([GradcamJob(image, layer, None, "gradcam", road=True) for image in images])
    return {"precision": engine.precision, "batch": len(images), "layer": layer, "seconds_per_image": seconds}


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def markdown(record: dict) -> str:
    points = record["points"]
    baseline = record["gradcam_images_per_s"]
    lines = [
        "# CAM methods and ROAD: what they cost",
        "",
        f"Machine: {record['machine']['cpu']}, {record['machine']['cores']} cores, load average at start "
        f"{', '.join(f'{x:.1f}' for x in record['machine']['load_average_at_start'])}; camserve picked "
        f"{record['precision']} and TTA `{record['tta']}`. Command: `{record['command']}` ({record['started']}).",
        "",
        f"## `/gradcam`, single-image requests, hey c={record['concurrency']}, {record['duration_s']:g} s per point",
        "",
        "| query | images/s | vs Grad-CAM | p50 ms | p99 ms | non-200 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for point in points:
        lines.append(
            f"| `{point['endpoint'].partition('?')[2]}` | {point['images_per_s']:.1f} | "
            f"{point['images_per_s'] / baseline:.2f} | {_ms(point['p50_ms'])} | {_ms(point['p99_ms'])} | "
            f"{point['non_200'] + point['errors']} |"
        )
    road = record["road"]
    lines += [
        "",
        f"Grad-CAM baseline: {baseline:.1f} images/s, the mean of the first and last points "
        f"({record['gradcam_drift']:.0%} apart). Every gradient method runs the same forward and backward; "
        "only the few tensor operations that turn activations and gradients into a map differ.",
        "",
        f"With `faithfulness=road`: {road['images_per_s']:.1f} images/s, {road['seconds_per_image'] * 1000:.0f} ms "
        f"per image against {1000 / baseline:.0f} ms without: {road['extra_ms_per_image']:.0f} ms more per image, "
        f"{road['cost_ratio']:.1f}x the cost of plain `/gradcam`.",
        "",
        f"## In process: `TorchEngine.gradcam`, a batch of {record['in_process']['batch']} real images, "
        f"`{record['in_process']['layer']}`, best of {record['repeats']}",
        "",
        "| method | ms per image |",
        "|---|---:|",
    ]
    for method, seconds in record["in_process"]["seconds_per_image"].items():
        lines.append(f"| {method} | {seconds * 1000:.2f} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=sb.DEFAULT_MODEL_DIR)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per timed point")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="in-process runs per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    machine = harness.machine_info()
    plan = sb.Plan(harness.require_hey("hey"), args.duration, args.warmup, [args.concurrency], args.concurrency)
    pngs = sb.load_images(args.model_dir / "misclassified")
    points: list[sb.Point] = []
    with tempfile.TemporaryDirectory(prefix="cam-methods-") as tmp:
        workdir = Path(tmp)
        body = harness.multipart_body(pngs[:1], workdir / "one.body")
        launcher = sb.Launcher(workdir, harness.DEFAULT_START_TIMEOUT_S)
        with launcher.camserve("camserve", args.model_dir) as server:
            health = json.loads(harness.request("GET", server.base_url + "/health")[1])
            for method in [*METHODS, "gradcam"]:
                points.append(hey_gradcam(plan, server, f"method={method}", body, args.concurrency))
            road_point = hey_gradcam(plan, server, "method=gradcam&faithfulness=road", body, args.concurrency)
    images = [image_to_uint8(Image.open(io.BytesIO(data))) for _, data in pngs[:16]]
    local = in_process(args.model_dir, health["precision"], images, args.repeats)

    first, last = points[0].images_per_s, points[-1].images_per_s
    baseline = (first + last) / 2
    road_seconds = 1 / road_point.images_per_s
    record = {
        "started": started,
        "command": "python " + shlex.join(sys.argv if argv is None else [sys.argv[0], *argv]),
        "machine": machine,
        "precision": health["precision"],
        "tta": health["test_time_augmentation"],
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "repeats": args.repeats,
        "points": [vars(point) for point in points],
        "gradcam_images_per_s": baseline,
        "gradcam_drift": abs(first - last) / baseline,
        "methods_vs_gradcam": {p.endpoint: p.images_per_s / baseline for p in points},
        "road": {
            **vars(road_point),
            "seconds_per_image": road_seconds,
            "extra_ms_per_image": (road_seconds - 1 / baseline) * 1000,
            "cost_ratio": baseline / road_point.images_per_s,
        },
        "in_process": local,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

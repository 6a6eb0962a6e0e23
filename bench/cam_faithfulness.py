"""Which CAM method and layer to trust: mean ROAD per method and layer on real test images.

For a seeded sample of the test set, every method of :mod:`camcore.cam_methods` at every layer makes
the heatmap the service would answer (its precision, its test-time augmentation, the predicted class
as target: :meth:`service.inference.torch_engine.TorchEngine.gradcam`, the same code as ``/gradcam``), and ROAD
(:mod:`camcore.road`, the score ``/gradcam?faithfulness=road`` returns) scores it. A row of random
heatmaps (uniform noise at each layer's resolution, upsampled and scaled like a CAM) gives the
scale: what a heatmap that knows nothing scores.

    python bench/cam_faithfulness.py --data-dir ../shared/data/cifar10-jpeg.tar.gz            # 1,000 images
    python bench/cam_faithfulness.py --data-dir ... --images 20 --no-write-bundle              # a quick look
    python bench/cam_faithfulness.py --write-from-results   # only set model.json's key from bench/results/

Writes ``bench/results/cam_faithfulness.{md,json}`` and, unless ``--no-write-bundle``, the key
``cam_faithfulness`` of the bundle's ``model.json`` (only that key; the weights and their sha256
are untouched), which ``/health`` and the web page's model card show. About 18 forward passes and
18 linear solves per heatmap, 24 heatmaps per image: on 2 CPU cores, about an hour for 1,000 images.
Progress is kept in ``--work`` after every batch, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # the kit, also under `python -m`

from harness import cpu_model  # noqa: E402

from camcore.bundle import METADATA_FILE, load_bundle  # noqa: E402
from camcore.cam import to_heatmaps  # noqa: E402
from camcore.cam_methods import METHODS  # noqa: E402
from camcore.network import block_geometry  # noqa: E402
from camcore.road import PERCENTILES, road_scores  # noqa: E402
from service.inference.jobs import GradcamJob  # noqa: E402
from service.inference.torch_engine import TorchEngine  # noqa: E402
from training import data  # noqa: E402

RANDOM = "random"
RESULTS = REPO / "bench" / "results"


def default_archive() -> Path:
    """The shared archive beside the checkout (where the README's commands expect it), else /work/shared."""
    candidates = [REPO.parent / "shared/data/cifar10-jpeg.tar.gz", Path("/work/shared/data/cifar10-jpeg.tar.gz")]
    return next((path for path in candidates if path.is_file()), candidates[0])


def sample_test_images(data_dir: Path, count: int, seed: int) -> torch.Tensor:
    """A seeded sample of the test set (uint8), in a fixed order; the same for every method and layer."""
    test = data.load("folder", data_dir).test
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:count]
    return test.images[order.sort().values]


def score_batch(engine: TorchEngine, images: torch.Tensor, layer: str, size: int, seed: int) -> dict[str, list]:
    """ROAD of every method's heatmap, and of a random one, for one batch at one layer."""
    jobs = [GradcamJob(image, layer, None, method, road=True) for method in METHODS for image in images]
    rows = engine.gradcam(jobs)
    scores = {
        method: [r.road for r in rows[i * len(images) : (i + 1) * len(images)]] for i, method in enumerate(METHODS)
    }
    targets = [r.target for r in rows[: len(images)]]  # the same for every method: the predicted class
    noise = torch.rand(len(images), size, size, generator=torch.Generator().manual_seed(seed))
    random_heatmaps = to_heatmaps(noise, tuple(images.shape[-2:]))
    scores[RANDOM] = road_scores(engine.plain_forward, images, random_heatmaps, targets).tolist()
    return scores


def summarise(per_image: dict[str, dict[str, list[float]]], layers: list[str]) -> tuple[dict, dict]:
    means: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for method in [*METHODS, RANDOM]:
        means[method], errors[method] = {}, {}
        for layer in layers:
            values = np.asarray(per_image[layer][method], dtype=np.float64)
            means[method][layer] = round(float(values.mean()), 4)
            errors[method][layer] = round(float(values.std(ddof=1) / np.sqrt(len(values))), 4)
    return means, errors


def markdown(record: dict) -> str:
    layers, road, err = record["layers"], record["road"], record["standard_error"]
    lines = [
        "# Which CAM method and layer to trust: ROAD per method and layer",
        "",
        f"Mean ROAD (Rong et al. 2022, higher is more faithful) of the heatmap `/gradcam` answers, on "
        f"{record['images']:,} test images (seeded sample, seed {record['seed']}) of the shared archive, "
        f"the shipped bundle, {record['precision']} (the precision the service picked), "
        f"test-time augmentation `{record['test_time_augmentation']}`, target: the predicted class. "
        f"± is the standard error of the mean over images. {record['definition']}",
        "",
        "| method | " + " | ".join(f"`{layer}`" for layer in layers) + " |",
        "|---|" + "---:|" * len(layers),
    ]
    for method in road:
        cells = [f"{road[method][layer]:.3f} ± {err[method][layer]:.3f}" for layer in layers]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    best = record["best"]
    lines += [
        "",
        f"Most faithful: **{best['method']} at `{best['layer']}`** ({best['road']:.3f}).",
        "",
        f"Machine: {record['machine']}. Command: `{record['command']}`. Started {record['started']}, "
        f"{record['seconds'] / 60:.1f} min ({record['heatmaps_scored']:,} heatmaps scored, "
        f"{record['forward_passes']:,} image forward passes for ROAD).",
        "",
    ]
    return "\n".join(lines)


def write_into_bundle(bundle_dir: Path, record: dict) -> None:
    """Set ``cam_faithfulness`` in ``model.json``, leaving every other key, and the file's style, as it was."""
    path = bundle_dir / METADATA_FILE
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata["cam_faithfulness"] = record
    path.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=default_archive(), help="default: %(default)s")
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "cifar10-resnet")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (x5 methods per CAM pass)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    parser.add_argument("--tta", choices=["none", "flip"], default="flip", help="as CAMSERVE_TTA (default flip)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="stop after this much scoring time")
    parser.add_argument("--work", type=Path, default=Path("/tmp/camserve-cam-faithfulness.json"))
    parser.add_argument("--out", type=Path, default=RESULTS / "cam_faithfulness")
    parser.add_argument("--no-write-bundle", dest="write_bundle", action="store_false")
    parser.add_argument(
        "--write-from-results",
        action="store_true",
        help="compute nothing: set model.json's key from the --out .json of an earlier run (e.g. after a merge)",
    )
    args = parser.parse_args(argv)
    if args.write_from_results:
        write_into_bundle(args.model_dir, json.loads(args.out.with_suffix(".json").read_text()))
        return 0
    torch.set_num_threads(args.threads)
    started = dt.datetime.now(dt.UTC)

    bundle = load_bundle(args.model_dir)
    # Batch 32 (CAMSERVE_MAX_BATCH_SIZE's default) is what the service times its precision choice at.
    engine = TorchEngine(bundle, torch.device("cpu"), args.precision, 32, trace=False, tta=args.tta)
    images = sample_test_images(args.data_dir, args.images, args.seed)
    geometry = {row.name: row.output_size for row in block_geometry(bundle.model)}
    layers = list(geometry)
    key = {"images": len(images), "seed": args.seed, "precision": engine.precision, "tta": args.tta}
    work = json.loads(args.work.read_text()) if args.work.is_file() else {}
    if work.get("key") != key:
        work = {"key": key, "done": {}, "seconds": 0.0}
    print(f"{len(images)} images, precision {engine.precision} ({engine.precision_reason})", flush=True)
    for layer in layers:
        work["done"].setdefault(layer, {m: [] for m in [*METHODS, RANDOM]})
    # Batch by batch, every layer for each batch: a run stopped by --budget-s covers all layers equally.
    while (start := min(len(work["done"][layer][RANDOM]) for layer in layers)) < len(images):
        if work["seconds"] > args.budget_s:
            print(f"stopping at {start} images: the time budget of {args.budget_s:.0f} s is spent", flush=True)
            break
        batch_clock = time.perf_counter()
        batch = images[start : start + args.batch_size]
        for layer in layers:
            done = work["done"][layer]
            if len(done[RANDOM]) > start:
                continue
            for method, values in score_batch(engine, batch, layer, geometry[layer], args.seed + start).items():
                done[method].extend(values)
        work["seconds"] += time.perf_counter() - batch_clock
        args.work.write_text(json.dumps(work))
        layer2 = {m: round(float(np.mean(v)), 3) for m, v in work["done"][layers[-2]].items()}
        print(f"{start + len(batch)}/{len(images)} {work['seconds']:.0f}s {layers[-2]}: {layer2}", flush=True)
    scored = min(len(work["done"][layer][RANDOM]) for layer in layers)
    work["done"] = {layer: {m: v[:scored] for m, v in rows.items()} for layer, rows in work["done"].items()}

    road, errors = summarise(work["done"], layers)
    best_method, best_layer = max(((m, layer) for m in METHODS for layer in layers), key=lambda c: road[c[0]][c[1]])
    heatmaps = scored * len(layers) * (len(METHODS) + 1)
    record = {
        "metric": "ROAD",
        "definition": (
            "ROAD as pytorch_grad_cam.metrics.road.ROADCombined computes it with ClassifierOutputSoftmaxTarget: "
            f"percentiles {PERCENTILES[0]}..{PERCENTILES[-1]}, most- and least-relevant-first removals filled "
            "by linear imputation (without the package's 0.01 noise) on the normalised image, score the change "
            "in the target's softmax probability of the plain network, ROAD = (LeRF - MoRF) / 2 averaged over "
            "the percentiles; the random row scores uniform noise maps at each layer's resolution, "
            "upsampled like a CAM."
        ),
        "images": scored,
        "seed": args.seed,
        "precision": engine.precision,
        "test_time_augmentation": args.tta,
        "target": "predicted class",
        "layers": layers,
        "road": road,
        "standard_error": errors,
        "best": {"method": best_method, "layer": best_layer, "road": road[best_method][best_layer]},
        "machine": f"{cpu_model()}, {torch.get_num_threads()} torch threads",
        "command": "python " + shlex.join([*sys.argv[:1], *(argv if argv is not None else sys.argv[1:])]),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(work["seconds"], 1),  # scoring time, summed over resumed runs
        "heatmaps_scored": heatmaps,
        "forward_passes": heatmaps * 2 * len(PERCENTILES),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    if args.write_bundle:
        write_into_bundle(args.model_dir, record)
    print(markdown(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

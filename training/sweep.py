"""Train several recipes side by side within a wall-clock budget and keep the best by validation.

Made for a lent accelerator: time on it is counted, a one-cycle schedule must know its length
before it starts, and one small ResNet does not fill a modern GPU. So the sweep first trains every
variant for a few epochs *concurrently* to measure what one epoch costs when they share the device,
then sizes the real runs to the time left, runs them concurrently, and picks the winner on the
validation split (never on the test set, whose figures are only reported). The winner is written as
a slim checkpoint (weights, hyper-parameters, provenance; no optimiser state) that
``python -m training export`` turns into a serving bundle.

    python -m training.sweep --data-dir cifar10-jpeg.tar.gz --budget-s 420 \\
        --variant base= --variant cutmix="--cutmix 0.5"
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from training import data

SLIM_KEYS = ("state_dict", "hyper_parameters", "camserve", "epoch", "global_step", "pytorch-lightning_version")


@dataclass
class Variant:
    name: str
    flags: list[str]
    run_dir: Path | None = None
    returncode: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    name, _, flags = text.partition("=")
    if not name.isidentifier():
        raise argparse.ArgumentTypeError(f"variant {text!r}: expected NAME=FLAGS with NAME a plain word")
    return Variant(name, shlex.split(flags))


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the run's CSV log (the newest version, i.e. the last fit)."""
    logs = sorted(run_dir.glob("logs/version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not logs:
        return []
    with logs[-1].open(newline="") as handle:
        return list(csv.DictReader(handle))


def last_value(rows: list[dict[str, str]], column: str) -> float | None:
    values = [float(row[column]) for row in rows if row.get(column)]
    return values[-1] if values else None


def run_concurrently(variants: list[Variant], common: list[str], epochs: int, root: Path, deadline: float) -> float:
    """Start one ``fit`` per variant, wait for all (killing any still running at ``deadline``).

    Each run logs to ``ROOT/NAME/fit.log``.
    """
    started = time.monotonic()
    procs = []
    # Each run's CPU work (loading, Python) gets its share of the cores instead of all of them:
    # torch's default of one thread per core in every process oversubscribes the host.
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // len(variants)))}
    for variant in variants:
        variant.run_dir = root / variant.name
        variant.run_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "training", "fit", *common, "--run-dir", str(variant.run_dir)]
        command += ["--epochs", str(epochs), "--keep-checkpoints", "0", *variant.flags]
        log = (variant.run_dir / "fit.log").open("w")
        procs.append((variant, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for variant, proc, log in procs:
        try:
            variant.returncode = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            variant.returncode = proc.wait()
        log.close()
    return time.monotonic() - started


def calibrate(
    variants: list[Variant], common: list[str], epochs: int, root: Path, deadline: float
) -> tuple[float, float]:
    """(seconds per epoch, fixed seconds per run) with all variants sharing the device."""
    wall = run_concurrently(variants, common, epochs, root / "calibration", deadline)
    failed = [v.name for v in variants if v.returncode != 0]
    if failed:
        raise SystemExit(f"calibration failed for {failed}: see {root}/calibration/*/fit.log")
    per_epoch = 0.0
    for variant in variants:
        assert variant.run_dir is not None
        seconds = [float(r["epoch_seconds"]) for r in read_metrics(variant.run_dir) if r.get("epoch_seconds")]
        # The first epoch pays for cuDNN's kernel search and warm-up; later ones are the steady state.
        per_epoch = max(per_epoch, statistics.median(seconds[1:] or seconds))
    return per_epoch, max(0.0, wall - epochs * per_epoch)


def slim_checkpoint(source: Path, target: Path) -> None:
    """Everything ``load_from_checkpoint`` and export need, without the optimiser's state."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    torch.save({key: checkpoint[key] for key in SLIM_KEYS if key in checkpoint}, target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--run-root", default="runs/sweep")
    parser.add_argument("--budget-s", type=float, required=True, help="wall-clock seconds for the whole sweep")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True, help="NAME=FIT_FLAGS")
    parser.add_argument("--common", default="", help="fit flags shared by every variant")
    parser.add_argument("--calibration-epochs", type=int, default=3)
    parser.add_argument("--max-epochs", type=int, default=400)
    parser.add_argument("--reserve-s", type=float, default=20.0, help="kept back for collecting the results")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    root = Path(args.run_root)
    root.mkdir(parents=True, exist_ok=True)

    data.prepare("folder", args.data_dir, Path(args.cache_dir) if args.cache_dir else None)  # decode once
    common = ["--data-dir", args.data_dir, *(["--cache-dir", args.cache_dir] if args.cache_dir else [])]
    common += shlex.split(args.common)
    variants: list[Variant] = args.variant

    per_epoch, overhead = calibrate(variants, common, args.calibration_epochs, root, deadline)
    left = deadline - time.monotonic() - overhead - args.reserve_s
    epochs = min(args.max_epochs, math.floor(left / per_epoch))
    print(f"calibration: {per_epoch:.2f} s/epoch, {overhead:.1f} s fixed; {left:.0f} s left -> {epochs} epochs")
    if epochs < 1:
        raise SystemExit("no time left for a real run")

    wall = run_concurrently(variants, common, epochs, root, deadline)
    for variant in variants:
        assert variant.run_dir is not None
        rows = read_metrics(variant.run_dir)
        for column in ("val_acc", "test_acc", "epoch_seconds"):
            value = last_value(rows, column)
            if value is not None:
                variant.metrics[column] = value
    finished = [v for v in variants if v.returncode == 0 and "val_acc" in v.metrics]
    summary = {
        "epochs": epochs,
        "seconds_per_epoch_calibrated": round(per_epoch, 3),
        "wall_seconds": round(wall, 1),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "common_flags": common,
        "variants": [{**asdict(v), "run_dir": str(v.run_dir)} for v in variants],
        "selected_by": "val_acc",
    }
    if finished:
        best = max(finished, key=lambda v: v.metrics["val_acc"])
        assert best.run_dir is not None
        slim_checkpoint(best.run_dir / "checkpoints" / "last.ckpt", root / "best.ckpt")
        summary["best"] = best.name
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if not finished:
        raise SystemExit("no variant finished")


if __name__ == "__main__":
    main()

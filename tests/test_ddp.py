"""Training on several devices: two DDP processes on the CPU (gloo), one short epoch, through the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import shared_cifar_archive
from helpers import real_test_slice

from training.schedule import custom_one_cycle_lr

ROOT = Path(__file__).resolve().parent.parent


def real_image_folder(archive: Path, root: Path, train_per_class: int, test_per_class: int) -> Path:
    """A small image folder of real CIFAR-10 JPEGs (first test images of each class, split in two)."""
    per_class: dict[str, int] = {}
    for name, data, label in real_test_slice(archive, train_per_class + test_per_class):
        seen = per_class.get(label, 0)
        per_class[label] = seen + 1
        folder = root / ("train" if seen < train_per_class else "test") / label
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return root


@pytest.mark.server  # two training processes
def test_two_ddp_processes_on_the_cpu_train_one_epoch(tiny_folder: Path, tmp_path: Path):
    archive = shared_cifar_archive()
    # 10 classes x 8 training images; with --val-size 16, 64 train: 4 batches of 16 in all.
    folder = real_image_folder(archive, tmp_path / "cifar", 8, 2) if archive else tiny_folder
    train_images = sum(1 for _ in (folder / "train").rglob("*.jpg"))
    val_size, batch, devices = 16, 16, 2
    run_dir = tmp_path / "run"
    command = [
        *(sys.executable, "-m", "training", "fit", "--data-dir", str(folder), "--cache-dir", str(tmp_path / "cache")),
        *("--run-dir", str(run_dir), "--epochs", "1", "--batch-size", str(batch), "--val-size", str(val_size)),
        *("--precision", "32-true", "--accelerator", "cpu", "--devices", str(devices), "--strategy", "ddp"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "MEMBER: 1/2" in output and "MEMBER: 2/2" in output  # both processes joined the group
    assert "distributed_backend=gloo" in output

    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    # Lightning deals whole batches of `batch` images to the 2 processes: every step, each runs its own.
    batches = (train_images - val_size) // batch
    steps = -(-batches // devices)
    assert checkpoint["global_step"] == steps < batches
    # The one-cycle schedule counted those steps: it ends exactly at its floor (0) after the last one.
    scheduler = checkpoint["lr_schedulers"][0]
    assert scheduler["last_epoch"] == steps
    assert scheduler["_last_lr"][0] == pytest.approx(0.4 * custom_one_cycle_lr(steps, steps), abs=1e-12) == 0.0
    assert "test_acc" in output

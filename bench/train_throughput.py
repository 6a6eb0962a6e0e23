"""Training throughput: the Lightning job against a minimal plain-PyTorch loop, in one run.

Both sides train the same network on the same uint8 batches with the same batch augmentation,
optimiser and precision; the only difference is who drives the loop. Also: fp32 vs bf16 autocast and
contiguous vs channels_last for the plain loop. A fixed number of timed batches after warm-up
stands in for an epoch (a full epoch per configuration would take most of an hour on 2 cores).

    python bench/train_throughput.py [--batches 12] [--warmup 2] [--data-dir ../shared/data/cifar10-jpeg.tar.gz]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.module import CifarResNetModule, hardware_description, smoothed_nll_loss

RESULTS = Path(__file__).resolve().parent / "results"


class BatchTimer(L.Callback):
    """Wall time from the first timed batch's start to the last batch's end."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.started = 0.0
        self.ended = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.ended = time.perf_counter()


def make_module(args: argparse.Namespace) -> CifarResNetModule:
    module = CifarResNetModule(data_dir=args.data_dir, batch_size=args.batch_size, epochs=1)
    module.prepare_data()
    module.setup("fit")
    return module


def lightning_rate(args: argparse.Namespace, precision: str) -> float:
    module = make_module(args)
    timer = BatchTimer(args.warmup)
    trainer = L.Trainer(
        max_steps=args.warmup + args.batches,
        limit_val_batches=0,
        precision=precision,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module)
    return args.batches * args.batch_size / (timer.ended - timer.started)


def plain_rate(args: argparse.Namespace, bf16: bool, channels_last: bool) -> float:
    """The loop Lightning replaces: same module pieces, no Trainer."""
    module = make_module(args)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    net = module.net.to(memory_format=memory_format).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # stepped per batch, as in the job
    loader = iter(module.train_dataloader())
    started = 0.0
    for step in range(args.warmup + args.batches):
        if step == args.warmup:
            started = time.perf_counter()
        images, labels = next(loader)
        x = module.train_transform(images).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            log_probs = F.log_softmax(net(x).float(), dim=1)
        loss = smoothed_nll_loss(log_probs, labels, 0.2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return args.batches * args.batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz")
    )
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()

    rows = []

    def record(name: str, loop: str, precision: str, layout: str, rate: float) -> None:
        rows.append({"name": name, "loop": loop, "precision": precision, "layout": layout, "images_per_s": rate})
        print(f"{name:<34} {rate:8.1f} img/s", flush=True)

    torch.manual_seed(0)
    record("plain bf16 channels_last", "plain", "bf16", "channels_last", plain_rate(args, True, True))
    record(
        "lightning bf16-mixed channels_last", "lightning", "bf16", "channels_last", lightning_rate(args, "bf16-mixed")
    )
    record("plain bf16 contiguous", "plain", "bf16", "contiguous", plain_rate(args, True, False))
    record("plain fp32 channels_last", "plain", "fp32", "channels_last", plain_rate(args, False, True))
    record("plain fp32 contiguous", "plain", "fp32", "contiguous", plain_rate(args, False, False))
    record("lightning fp32 channels_last", "lightning", "fp32", "channels_last", lightning_rate(args, "32-true"))

    by_name = {row["name"]: row["images_per_s"] for row in rows}
    ratios = {
        "lightning_vs_plain_bf16": by_name["lightning bf16-mixed channels_last"] / by_name["plain bf16 channels_last"],
        "lightning_vs_plain_fp32": by_name["lightning fp32 channels_last"] / by_name["plain fp32 channels_last"],
        "bf16_vs_fp32_channels_last": by_name["plain bf16 channels_last"] / by_name["plain fp32 channels_last"],
        "channels_last_vs_contiguous_bf16": by_name["plain bf16 channels_last"] / by_name["plain bf16 contiguous"],
    }
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": hardware_description(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "batch_size": args.batch_size,
        "timed_batches": args.batches,
        "warmup_batches": args.warmup,
        "results": rows,
        "ratios": ratios,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Training throughput",
        "",
        f"{result['machine']}, torch {result['torch']}, lightning {result['lightning']}, {result['date']}",
        f"`{result['command']}`: batch {args.batch_size}, {args.batches} timed batches after {args.warmup} warm-up.",
        "",
        "| configuration | images/s |",
        "|---|---:|",
        *[f"| {row['name']} | {row['images_per_s']:.1f} |" for row in rows],
        "",
        *[f"- {name}: {value:.3f}" for name, value in ratios.items()],
        "",
    ]
    (RESULTS / "train_throughput.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

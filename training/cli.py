"""``python -m training fit|test|export|calibrate|quantize``: train, evaluate a checkpoint, write a serving
bundle, fit a bundle's temperature, quantize a bundle's network to INT8."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger

from training.module import CifarResNetModule

log = logging.getLogger("training")


def default_precision() -> str:
    """bf16 autocast where the hardware does it natively (CUDA, or a CPU with AVX-512 BF16/AMX)."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "bf16-mixed" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "32-true"


def training_device() -> torch.device:
    """Where ``accelerator="auto"`` with one device trains: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_trainer(
    run_dir: Path,
    epochs: int,
    precision: str,
    fast_dev_run: bool = False,
    progress_bar: bool = True,
    keep_checkpoints: int = -1,
    ema_decay: float = 0.0,
    accelerator: str = "auto",
    devices: int | str = 1,
    num_nodes: int = 1,
    strategy: str = "auto",
) -> L.Trainer:
    """The fit trainer. ``accelerator``, ``devices``, ``num_nodes`` and ``strategy`` are Lightning's own;
    with several processes each runs ``batch_size`` images a step (Lightning splits the batches among
    them), so a step sees ``batch_size x devices x num_nodes`` images and an epoch has that many times
    fewer steps, which the one-cycle schedule counts (``estimated_stepping_batches``)."""
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="epoch{epoch:03d}-val_acc{val_acc:.4f}",
        auto_insert_metric_name=False,
        save_last=True,  # last.ckpt: what `fit` resumes from after an interruption
        enable_version_counter=False,  # always overwrite last.ckpt, never write last-v1.ckpt
        # -1: one per epoch; k: the k best by val_acc; 0: only the newest. (Lightning refreshes
        # last.ckpt only when it saves another checkpoint, so "none" would mean no resumable state.)
        save_top_k=keep_checkpoints if keep_checkpoints != 0 else 1,
        monitor=None if keep_checkpoints in (-1, 0) else "val_acc",
        mode="max",
        every_n_epochs=1,
    )
    return L.Trainer(
        max_epochs=epochs,
        precision=precision,
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        default_root_dir=run_dir,
        logger=CSVLogger(run_dir, name="logs"),
        callbacks=[checkpoints, LearningRateMonitor(logging_interval="step")]
        + ([TQDMProgressBar(refresh_rate=10)] if progress_bar else [])
        # Validation, test and every checkpoint's state_dict see the averaged weights; the raw ones
        # stay in the checkpoint as "current_model_state" so a resumed fit continues from them.
        # The device is named because the callback copies the module before Lightning moves it there:
        # an average kept on the CPU would cost a device-to-host copy every step.
        + ([EMAWeightAveraging(decay=ema_decay, device=training_device())] if ema_decay else []),
        enable_progress_bar=progress_bar,
        fast_dev_run=fast_dev_run,
        log_every_n_steps=10,
        benchmark=torch.cuda.is_available(),  # fixed shapes: let cuDNN pick its fastest kernels
    )


def cmd_fit(args: argparse.Namespace) -> None:
    L.seed_everything(args.seed, workers=True)
    run_dir = Path(args.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    module = CifarResNetModule(
        lr=args.lr,
        data_dir=args.data_dir,
        source=args.source,
        batch_size=args.batch_size,
        epochs=args.epochs,
        label_smoothing=args.label_smoothing,
        warmup_fraction=args.warmup_fraction,
        weight_decay=args.weight_decay,
        cutout_size=args.cutout_size,
        cutmix=args.cutmix,
        ghost_batch_size=args.ghost_batch_size,
        ema_decay=args.ema_decay,
        val_size=args.val_size,
        seed=args.seed,
        cache_dir=args.cache_dir,
    )
    trainer = build_trainer(
        run_dir,
        args.epochs,
        args.precision,
        fast_dev_run=args.fast_dev_run,
        keep_checkpoints=args.keep_checkpoints,
        ema_decay=args.ema_decay,
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
    )
    resume = str(last) if last.is_file() and not args.fast_dev_run else None
    if resume:
        log.warning("resuming from %s", resume)
    trainer.fit(module, ckpt_path=resume)
    if not args.fast_dev_run:
        # The weights fit ended with (the averaged ones under EMA, which on_train_end copies in), as
        # last.ckpt's state_dict holds them. Not ckpt_path="last": the EMA callback would then load
        # the checkpoint's raw "current_model_state" into the module and test those instead.
        trainer.test(module)


def cmd_test(args: argparse.Namespace) -> None:
    module = CifarResNetModule.load_from_checkpoint(args.checkpoint, map_location="cpu")
    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("cache_dir", args.cache_dir)) if v}
    module.hparams.update(overrides)
    trainer = L.Trainer(precision=args.precision, accelerator="auto", devices=1, logger=False)
    trainer.test(module)


def cmd_export(args: argparse.Namespace) -> None:
    from training.export import export_bundle

    path = export_bundle(
        Path(args.checkpoint),
        Path(args.out),
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        misclassified=args.misclassified,
    )
    print(f"bundle written to {path}")


def cmd_calibrate(args: argparse.Namespace) -> None:
    from training.calibration import calibrate_bundle

    record = calibrate_bundle(
        Path(args.bundle), data_dir=args.data_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else None
    )
    print(f"temperature {record['temperature']} fitted on {record['fitted_on']['images']} held-out images")
    for mode, figures in record["test"].items():
        before, after = figures["before"], figures["after"]
        print(
            f"test, TTA {mode}: ECE {before['ece']:.4f} -> {after['ece']:.4f}, NLL {before['nll']:.4f} -> "
            f"{after['nll']:.4f}, Brier {before['brier']:.4f} -> {after['brier']:.4f}, "
            f"accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}"
        )
    print(f"written to {Path(args.bundle) / 'model.json'}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from training.quantize import quantize_bundle

    record = quantize_bundle(
        Path(args.bundle), data_dir=args.data_dir, cache_dir=Path(args.cache_dir) if args.cache_dir else None
    )
    print(f"INT8 network written; temperature {record['temperature']} refitted on held-out images")
    for mode, figures in record["test"].items():
        print(
            f"test, TTA {mode}: accuracy {figures['accuracy']:.4f} (fp32 {figures['fp32_accuracy']:.4f}), agreement "
            f"with fp32 {figures['agreement']:.4f}, ECE {figures['ece']:.4f}, NLL {figures['nll']:.4f}, "
            f"Brier {figures['brier']:.4f}"
        )
    print(f"written to {Path(args.bundle) / 'model.json'}")


def _devices(value: str) -> int | str:
    """Lightning's ``devices``: a count (or -1 for all) as an int; "auto" and id lists ("0,2") as given."""
    return int(value) if value.lstrip("-").isdecimal() else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def data_args(p: argparse.ArgumentParser, required: bool) -> None:
        p.add_argument("--data-dir", required=required, help="image folder, its .tar.gz, or torchvision root")
        p.add_argument("--cache-dir", default=None, help="where decoded uint8 tensors are cached")

    fit = sub.add_parser("fit", help="train (resumes from RUN_DIR/checkpoints/last.ckpt if present)")
    data_args(fit, required=True)
    fit.add_argument("--source", choices=["folder", "torchvision"], default="folder")
    fit.add_argument("--run-dir", default="runs/cifar10")
    fit.add_argument("--epochs", type=int, default=24)
    fit.add_argument("--lr", type=float, default=0.4, help="one-cycle peak learning rate")
    fit.add_argument("--batch-size", type=int, default=512)
    fit.add_argument("--label-smoothing", type=float, default=0.2)
    fit.add_argument("--warmup-fraction", type=float, default=0.2)
    fit.add_argument("--weight-decay", type=float, default=5e-4, help="on weights only, not on BatchNorm")
    fit.add_argument("--cutout-size", type=int, default=8, help="side of the cutout square; 0 turns it off")
    fit.add_argument("--cutmix", type=float, default=0.0, help="fraction of batches given CutMix (0: none)")
    fit.add_argument(
        "--ghost-batch-size", type=int, default=0, help="BatchNorm statistics over virtual batches of N (0: off)"
    )
    fit.add_argument("--ema-decay", type=float, default=0.0, help="per-step EMA of the weights, e.g. 0.999 (0: off)")
    fit.add_argument(
        "--keep-checkpoints", type=int, default=-1, help="-1: every epoch; k: the k best by val_acc; 0: the newest only"
    )
    fit.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--precision", default=default_precision())
    fit.add_argument("--fast-dev-run", action="store_true", help="one batch of each loop, as a smoke test")
    fit.add_argument("--accelerator", default="auto", help="Lightning's: auto, cpu, gpu, ...")
    fit.add_argument("--devices", type=_devices, default=1, help="Lightning's: a count, -1 (all), auto, or ids '0,2'")
    fit.add_argument("--num-nodes", type=int, default=1, help="machines, each running --devices processes")
    fit.add_argument("--strategy", default="auto", help="Lightning's: auto, ddp, ddp_spawn, fsdp, ...")
    fit.set_defaults(func=cmd_fit)

    test = sub.add_parser("test", help="evaluate a checkpoint on the test set")
    test.add_argument("checkpoint")
    data_args(test, required=False)
    test.add_argument("--precision", default=default_precision())
    test.set_defaults(func=cmd_test)

    export = sub.add_parser("export", help="write a serving bundle from a checkpoint")
    export.add_argument("checkpoint")
    export.add_argument("--out", default="models/cifar10-resnet")
    export.add_argument("--misclassified", type=int, default=40, help="test images the model got wrong to ship")
    data_args(export, required=False)
    export.set_defaults(func=cmd_export)

    calibrate = sub.add_parser(
        "calibrate", help="fit a bundle's temperature on its held-out images; rewrites model.json's calibration"
    )
    calibrate.add_argument("bundle", help="bundle directory, e.g. models/cifar10-resnet")
    data_args(calibrate, required=False)
    calibrate.set_defaults(func=cmd_calibrate)

    quantize = sub.add_parser(
        "quantize",
        help="quantize a bundle's network to INT8 (NNCF) on its held-out images; writes model_int8.xml/.bin "
        "and model.json's quantized record",
    )
    quantize.add_argument("bundle", help="bundle directory, e.g. models/cifar10-resnet")
    data_args(quantize, required=False)
    quantize.set_defaults(func=cmd_quantize)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    args.func(args)

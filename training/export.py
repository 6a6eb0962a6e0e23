"""Checkpoint -> serving bundle, with the metrics the service reports measured here, once."""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchmetrics.functional.classification import multiclass_confusion_matrix

from camcore.bundle import MISCLASSIFIED_DIR, write_bundle
from camcore.forward import Precision, ServedForward, in_batches
from camcore.network import block_geometry
from camcore.preprocess import CIFAR10_MEAN, CIFAR10_STD
from training import data
from training.calibration import calibration_record
from training.module import CifarResNetModule


def view_logits(net: torch.nn.Module, images: torch.Tensor, precision: Precision = "fp32") -> torch.Tensor:
    """(2, N, classes) fp32 logits of uint8 images and of their mirrors, through the serving recipe."""
    forward = ServedForward(net, CIFAR10_MEAN, CIFAR10_STD, precision=precision, tta="flip").eval()
    return in_batches(forward, images, logits=True)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round(float((logits.argmax(1) == labels).float().mean()), 5)


def _misclassified(
    out: Path, images: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor, classes: list[str], count: int
) -> list[dict[str, Any]]:
    """The ``count`` most confident mistakes: the ones worth looking at with Grad-CAM."""
    probs = logits.softmax(1)
    confidence, predicted = probs.max(1)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[confidence[wrong].argsort(descending=True)][:count]
    (out / MISCLASSIFIED_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for rank, index in enumerate(order.tolist()):
        filename = f"{MISCLASSIFIED_DIR}/{rank:03d}-test{index:05d}.png"
        Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(out / filename)
        entries.append(
            {
                "file": filename,
                "test_index": index,
                "true_label": classes[int(labels[index])],
                "predicted_label": classes[int(predicted[index])],
                "confidence": round(float(confidence[index]), 5),
            }
        )
    return entries


def export_bundle(
    checkpoint: Path,
    out: Path,
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
    misclassified: int = 40,
    name: str = "cifar10-resnet",
) -> Path:
    module = CifarResNetModule.load_from_checkpoint(checkpoint, map_location="cpu")
    hp = module.hparams
    data_dir = data_dir or hp.data_dir
    cifar = data.load(hp.source, data_dir, Path(cache_dir) if cache_dir else None)
    _, val = data.train_val_split(cifar.train, hp.val_size, hp.seed)
    net = module.net.float().eval()
    classes = cifar.classes

    test_views = view_logits(net, cifar.test.images)
    test_logits = test_views[0]
    val_views = view_logits(net, val.images)
    val_logits = val_views[0]
    agreement = {"fp32": 1.0}
    low: list[Precision] = ["bf16"] + (["fp16"] if torch.cuda.is_available() else [])
    for precision in low:
        low_logits = view_logits(net, cifar.test.images, precision)[0]
        agreement[precision] = round(float((low_logits.argmax(1) == test_logits.argmax(1)).float().mean()), 5)

    labels = cifar.test.labels
    confusion = multiclass_confusion_matrix(test_logits.argmax(1), labels, num_classes=len(classes))
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1)).tolist()
    extra = module.provenance
    metadata = {
        "name": name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "classes": classes,
        "mean": list(CIFAR10_MEAN),
        "std": list(CIFAR10_STD),
        "input_size": 32,
        "test_accuracy": _accuracy(test_logits, labels),
        # As the service computes it (CAMSERVE_TTA=flip): the mean of the two views' probabilities.
        "test_accuracy_flip_tta": _accuracy(test_views.softmax(2).mean(0), labels),
        "val_accuracy": _accuracy(val_logits, val.labels),
        "test_images": len(labels),
        "val_images": len(val.labels),
        "per_class_accuracy": {c: round(a, 4) for c, a in zip(classes, per_class, strict=True)},
        "confusion_matrix": confusion.tolist(),
        "precision_agreement": agreement,
        "trained_epochs": int(extra["trained_epochs"]),
        "training_seconds": round(float(extra.get("train_seconds", 0.0)), 1),
        "hardware": extra.get("hardware", "unknown"),
        "dataset": {"source": hp.source, "location": str(data_dir), "train_images": len(cifar.train) - hp.val_size},
        "seed": hp.seed,
        "recipe": {
            "optimizer": "SGD",
            "lr_peak": hp.lr,
            "momentum": hp.momentum,
            "nesterov": hp.nesterov,
            "weight_decay": hp.weight_decay,
            "batch_size": hp.batch_size,
            "schedule": f"one-cycle, linear warm-up over {hp.warmup_fraction:.0%} then linear to 0",
            "label_smoothing": hp.label_smoothing,
            "ghost_batch_size": hp.get("ghost_batch_size", 0),
            "ema_decay": hp.get("ema_decay", 0.0),
            "augmentation": f"reflect-pad {hp.crop_padding} crop, horizontal flip, cutout {hp.cutout_size}"
            + (f", CutMix on {hp.cutmix:.0%} of batches" if hp.get("cutmix", 0) else ""),
            "precision": extra.get("precision", "unknown"),
        },
        "gradcam": {
            "default_layer": net.default_cam_layer,
            "layers": [vars(row) for row in block_geometry(net)],
        },
        "torch_version": torch.__version__,
    }
    if len(val):  # a run that held images out gets its temperature fitted on them (never on the test set)
        metadata["calibration"] = calibration_record(
            val_views,
            val.labels,
            test_views,
            labels,
            {"split": f"training images held out by train_val_split(seed={hp.seed}, val_size={hp.val_size})"},
        )

    # Build beside the target and swap in, so a failed export never leaves half a bundle.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        metadata["misclassified"] = _misclassified(
            staging, cifar.test.images, labels, test_logits, classes, misclassified
        )
        write_bundle(staging, net, metadata)
        staging.chmod(0o755)  # mkdtemp makes it owner-only; a container's non-root user must read it
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

"""Fit a bundle's temperature on its held-out images and record what it does on the test set.

Used twice: by ``export`` (a run that held out images gets its calibration in the bundle it writes)
and by ``python -m training calibrate BUNDLE`` (an existing bundle is recalibrated in place: the
held-out split is rebuilt from the seed and size in ``model.json``, and checked by re-measuring the
recorded validation accuracy on it before anything is fitted on it).

One temperature is fitted, for the served default ``CAMSERVE_TTA=flip``, and used in both modes.
On the shipped bundle a separate fit for ``none`` gave T=0.58 against flip's 0.54, no better test
NLL (0.2335 either way) and a worse test ECE (0.018 against 0.015 with flip's T), so a second number
would add a knob without adding calibration.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from camcore.bundle import METADATA_FILE, Bundle, load_bundle
from camcore.calibration import ECE_BINS, calibration_report, fit_temperature, served_probabilities
from camcore.forward import ServedForward, in_batches
from training import data

log = logging.getLogger("training")

FITTED_FOR_TTA = "flip"  # the service's default CAMSERVE_TTA: the probabilities people are shown
VIEWS = {"flip": slice(0, 2), "none": slice(0, 1)}  # which of the (image, mirror) logits each mode averages


class SplitMismatch(RuntimeError):
    """The rebuilt held-out split is not the one the bundle was validated on: fitting on it could touch
    images the model trained on, so nothing is written."""


def temperature_interval(view_logits: torch.Tensor, labels: torch.Tensor, resamples: int = 200) -> list[float]:
    """A 90% bootstrap interval for T: says whether the held-out set was big enough for the fit."""
    generator = torch.Generator().manual_seed(0)
    fits = []
    for _ in range(resamples):
        rows = torch.randint(0, len(labels), (len(labels),), generator=generator)
        fits.append(fit_temperature(view_logits[:, rows], labels[rows]))
    low, high = (
        torch.tensor(fits, dtype=torch.float64).quantile(torch.tensor([0.05, 0.95], dtype=torch.float64)).tolist()
    )
    return [round(low, 4), round(high, 4)]


def calibration_record(
    val_views: torch.Tensor,
    val_labels: torch.Tensor,
    test_views: torch.Tensor,
    test_labels: torch.Tensor,
    split: dict[str, Any],
    resamples: int = 200,
) -> dict[str, Any]:
    """``model.json``'s ``calibration``: T fitted on held-out (views, N, classes) logits, and test-set
    ECE/NLL/Brier and reliability bins before (T=1) and after, for both test-time augmentation modes."""
    fit_views = val_views[VIEWS[FITTED_FOR_TTA]]
    temperature = fit_temperature(fit_views, val_labels)
    test: dict[str, Any] = {}
    for mode, views in VIEWS.items():
        before = served_probabilities(test_views[views])
        after = served_probabilities(test_views[views], temperature)
        test[mode] = {
            "before": calibration_report(before, test_labels).to_json(),
            "after": calibration_report(after, test_labels).to_json(),
            # Dividing one view's logits by T never moves its top-1; the mean of two views' softmaxes can
            # tip where the image and its mirror disagree. Counted, not assumed.
            "top1_changed": int((before.argmax(1) != after.argmax(1)).sum()),
        }
    return {
        "method": "temperature scaling (Guo et al. 2017): each view's logits / T before its softmax, then the TTA mean",
        "temperature": round(temperature, 5),
        "fitted_for_tta": FITTED_FOR_TTA,
        "fitted_on": {
            "images": len(val_labels),
            **split,
            "objective": f"NLL of the served ({FITTED_FOR_TTA} TTA) probabilities",
            "temperature_interval_90": temperature_interval(fit_views, val_labels, resamples),
        },
        "ece_bins": ECE_BINS,
        "test": test,
    }


def _held_out_split(bundle: Bundle, cifar: data.Cifar) -> tuple[data.Split, dict[str, Any]]:
    """The bundle's held-out images, rebuilt from its seed and size; :class:`SplitMismatch` if they are not."""
    meta = bundle.metadata
    missing = [key for key in ("seed", "val_images", "val_accuracy") if meta.get(key) is None]
    if missing:
        raise SplitMismatch(f"{bundle.path / METADATA_FILE}: no {missing}: cannot rebuild the held-out split")
    seed, size = int(meta["seed"]), int(meta["val_images"])
    recorded_train = (meta.get("dataset") or {}).get("train_images")
    if recorded_train is not None and recorded_train + size != len(cifar.train):
        raise SplitMismatch(
            f"the bundle trained on {recorded_train} + held out {size} images; this data set has {len(cifar.train)}"
        )
    _, val = data.train_val_split(cifar.train, size, seed)
    return val, {"split": f"training images held out by train_val_split(seed={seed}, val_size={size})"}


def load_held_out(
    bundle: Bundle, data_dir: str | None = None, cache_dir: Path | None = None
) -> tuple[data.Cifar, data.Split, dict[str, Any], ServedForward, torch.Tensor]:
    """The bundle's data set and held-out split, rebuilt from model.json and checked by re-measuring the
    recorded validation accuracy on it; with the fp32 flip-TTA recipe (on the GPU where there is one) and
    the held-out images' (2, N, classes) logits before any temperature. :class:`SplitMismatch` if not the same.
    """
    dataset = bundle.metadata.get("dataset") or {}
    source = dataset.get("source", "folder")
    location = data_dir or dataset.get("location")
    if not location:
        raise SplitMismatch("no --data-dir given and the bundle records no data location")
    cifar = data.load(source, location, cache_dir)
    if cifar.classes != bundle.classes:
        raise SplitMismatch(f"data set classes {cifar.classes} differ from the bundle's {bundle.classes}")
    val, split = _held_out_split(bundle, cifar)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bundle.model.to(device)
    # fp32, both views; logits come out before any temperature, so an already calibrated bundle refits cleanly.
    forward = ServedForward(bundle.model, bundle.mean, bundle.std, precision="fp32", tta="flip").eval()
    val_views = in_batches(forward, val.images, logits=True)
    remeasured = round(float((val_views[0].argmax(1) == val.labels).float().mean()), 5)
    if remeasured != bundle.metadata["val_accuracy"]:
        raise SplitMismatch(
            f"validation accuracy re-measured on the rebuilt split is {remeasured}, model.json records "
            f"{bundle.metadata['val_accuracy']}: not the same held-out images"
        )
    split["val_accuracy_remeasured"] = remeasured
    log.info("held-out split rebuilt: %d images, val accuracy %.5f as recorded", len(val), remeasured)
    return cifar, val, split, forward, val_views


def calibrate_bundle(bundle_dir: Path, data_dir: str | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Fit and record the bundle's temperature in place: only ``model.json``'s ``calibration`` key changes."""
    bundle = load_bundle(bundle_dir)  # verifies the weights' sha256 against model.json
    cifar, val, split, forward, val_views = load_held_out(bundle, data_dir, cache_dir)
    test_views = in_batches(forward, cifar.test.images, logits=True)
    record = calibration_record(val_views, val.labels, test_views, cifar.test.labels, split)
    write_calibration(bundle_dir, record)
    return record


def write_calibration(bundle_dir: Path, record: dict[str, Any], key: str = "calibration") -> None:
    """Replace ``key`` in model.json, re-read just before writing so other keys written meanwhile survive;
    same layout as :func:`camcore.bundle.write_bundle`, swapped in atomically."""
    path = Path(bundle_dir) / METADATA_FILE
    metadata = json.loads(path.read_text(encoding="utf-8"))
    metadata[key] = record
    if "weights_sha256" in metadata:  # keep the checksum last, where write_bundle puts it
        metadata["weights_sha256"] = metadata.pop("weights_sha256")
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    os.chmod(staging, path.stat().st_mode & 0o777)
    staging.replace(path)

"""``python -m training quantize BUNDLE``: the bundle's network quantized to INT8 after training (NNCF), on
its held-out images, written into the bundle as OpenVINO IR with what it measured on the test set.

* **Calibration data**: the held-out training images the bundle was validated on (rebuilt from the
  seed and size in model.json and checked by re-measuring the recorded validation accuracy,
  :func:`training.calibration.load_held_out`), each as the network sees it when served: normalised,
  and with its mirror (flip TTA). Never the test set.
* **Quantization**: ``nncf.quantize`` on the fp32 network converted to OpenVINO (8-bit symmetric
  weights and activations), every calibration view. Four variants (:data:`CANDIDATES`: the first
  convolution and the last linear layer quantized or left in f32, fast or full bias correction) are
  compared two-fold on the held-out images alone (:func:`held_out_divergence`); the closest to fp32 is
  quantized on all of them. The test set is never used to choose: it only measures.
* **Temperature**: refitted on the held-out images' INT8 logits (the served flip-TTA NLL, as
  ``python -m training calibrate`` fits fp32's), since INT8 rounds the logits a little differently;
  the service divides INT8 logits by this one.
* **Measured on the test set**, per TTA mode, as the service answers at INT8 (the compiled recipe
  around the quantized network, :mod:`camcore.openvino_forward`): accuracy, top-1 agreement with the
  fp32 torch network served the same way, and ECE, NLL and Brier of the served probabilities.
* **Written**: ``model_int8.xml``/``.bin`` and model.json's ``quantized`` (their sha256, the weights
  they came from, the figures), which :func:`camcore.bundle.load_bundle` verifies.
"""

from __future__ import annotations

import datetime as dt
import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nncf
import torch

from camcore import openvino_forward as ovf
from camcore.bundle import QUANTIZED_BIN, QUANTIZED_KEY, QUANTIZED_XML, load_bundle, sha256_of
from camcore.calibration import calibration_report, fit_temperature, served_probabilities
from camcore.forward import ServedForward, in_batches
from training.calibration import FITTED_FOR_TTA, VIEWS, load_held_out, temperature_interval, write_calibration

log = logging.getLogger("training")
LAYER_TYPES = ("Convolution", "MatMul")  # what NNCF quantizes in this network


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@dataclass(frozen=True)
class Candidate:
    """One way of quantizing: NNCF's defaults, or with the first convolution and the last linear layer left
    in floating point (the layers PTQ most often hurts: 3 input channels, 10 logits), and/or NNCF's full
    bias correction instead of its fast one."""

    keep_first_last: bool
    full_bias_correction: bool

    @property
    def name(self) -> str:
        parts = ["first conv and last linear in f32"] if self.keep_first_last else []
        parts.append("full bias correction" if self.full_bias_correction else "fast bias correction")
        return ", ".join(parts)


CANDIDATES = tuple(Candidate(keep, full) for keep in (False, True) for full in (False, True))


def _views(forward: ServedForward, images: torch.Tensor) -> torch.Tensor:
    """What the served flip recipe feeds the network: each image normalised, then every mirror."""
    with torch.inference_mode():
        return forward.inputs(images)


def quantize_network(network, views: torch.Tensor, candidate: Candidate):
    """``network`` (OpenVINO, fp32) quantized to INT8 with statistics of every one of ``views``."""
    layers = [op.get_friendly_name() for op in network.get_ordered_ops() if op.get_type_name() in LAYER_TYPES]
    options: dict[str, Any] = {"fast_bias_correction": not candidate.full_bias_correction}
    if candidate.keep_first_last:
        options["ignored_scope"] = nncf.IgnoredScope(names=[layers[0], layers[-1]])
    dataset = nncf.Dataset([views[i : i + 1].numpy() for i in range(len(views))])
    return nncf.quantize(network, dataset, subset_size=len(views), **options)


def held_out_divergence(network, recipe: ServedForward, views: torch.Tensor, candidate: Candidate) -> float:
    """Two-fold on the held-out images alone: quantize on the even images' views, measure the mean
    KL(fp32 || INT8) of the tempered softmax on the odd ones', and the other way round; the mean of both.
    A continuous measure, so 500 images can tell candidates apart where top-1 agreement (a few flips) cannot."""
    n = len(views) // 2  # images first, then their mirrors
    folds = [torch.arange(start, n, 2) for start in (0, 1)]
    folds = [torch.cat([fold, fold + n]) for fold in folds]
    total = 0.0
    for calibrate, evaluate in ((folds[0], folds[1]), (folds[1], folds[0])):
        quantized = quantize_network(network, views[calibrate], candidate)
        compiled = ovf.compile_served(quantized, "int8")
        logits = torch.from_numpy(ovf.in_batches(compiled, views[evaluate]))
        with torch.inference_mode():
            reference = (recipe.model(views[evaluate]) / recipe.temperature).log_softmax(1)
        served = (logits / recipe.temperature).log_softmax(1)
        total += float((reference.exp() * (reference - served)).sum(1).mean())
    return total / 2


def int8_view_logits(forward: ServedForward, network, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """(2, N, classes) logits of the images and their mirrors through the compiled INT8 recipe (flip views)."""
    compiled = ovf.compile_served(ovf.served_model(forward, network, probabilities=False), "int8")
    request = compiled.create_infer_request()
    batches = []
    for start in range(0, len(images), batch_size):
        logits = ovf.run(request, images[start : start + batch_size].numpy())  # (2 x n, classes): images, mirrors
        batches.append(torch.from_numpy(logits).view(2, -1, logits.shape[1]))
    return torch.cat(batches, dim=1)


def test_figures(
    fp32_views: torch.Tensor, int8_views: torch.Tensor, labels: torch.Tensor, fp32_t: float, int8_t: float
) -> dict[str, Any]:
    """Per TTA mode: INT8's served accuracy, agreement with fp32 served the same way, ECE/NLL/Brier."""
    out: dict[str, Any] = {}
    for mode, views in VIEWS.items():
        reference = served_probabilities(fp32_views[views], fp32_t)
        served = served_probabilities(int8_views[views], int8_t)
        report = calibration_report(served, labels).to_json()
        bundle_t = calibration_report(served_probabilities(int8_views[views], fp32_t), labels)
        out[mode] = {
            "images": len(labels),
            "accuracy": report["accuracy"],
            "fp32_accuracy": round(float((reference.argmax(1) == labels).double().mean()), 5),
            "agreement": round(float((served.argmax(1) == reference.argmax(1)).double().mean()), 5),
            "ece": report["ece"],
            "nll": report["nll"],
            "brier": report["brier"],
            "mean_confidence": report["mean_confidence"],
            "with_fp32_temperature": {"ece": round(bundle_t.ece, 5), "nll": round(bundle_t.nll, 5)},
        }
    return out


def quantize_bundle(bundle_dir: Path, data_dir: str | None = None, cache_dir: Path | None = None) -> dict[str, Any]:
    """Quantize, measure and write into the bundle in place; returns model.json's new ``quantized`` record."""
    bundle_dir = Path(bundle_dir)
    bundle = load_bundle(bundle_dir)  # verifies the weights (and any earlier quantized files)
    cifar, val, split, forward, _ = load_held_out(bundle, data_dir, cache_dir)
    log.info("fp32 reference on %d test images (both views)", len(cifar.test))
    test_views = in_batches(forward, cifar.test.images, logits=True)
    bundle.model.cpu()  # load_held_out ran it on the GPU where there is one; OpenVINO runs on the CPU
    recipe = ServedForward(
        bundle.model, bundle.mean, bundle.std, precision="fp32", tta="flip", temperature=bundle.temperature
    ).eval()

    views = _views(recipe, val.images)
    fp32_network = ovf.convert_network(bundle.model)
    divergence = {}
    for candidate in CANDIDATES:
        divergence[candidate] = held_out_divergence(fp32_network, recipe, views, candidate)
        log.info("candidate %s: held-out KL(fp32 || int8) %.6f", candidate.name, divergence[candidate])
    chosen = min(CANDIDATES, key=divergence.__getitem__)
    log.info("quantizing with %s on %d held-out images (%d views)", chosen.name, len(val), len(views))
    network = quantize_network(fp32_network, views, chosen)
    int8_val = int8_view_logits(recipe, network, val.images)
    fit_views = int8_val[VIEWS[FITTED_FOR_TTA]]
    temperature = fit_temperature(fit_views, val.labels)
    log.info("INT8 on %d test images (both views)", len(cifar.test))
    int8_test = int8_view_logits(recipe, network, cifar.test.images)
    figures = test_figures(test_views, int8_test, cifar.test.labels, bundle.temperature, temperature)

    # Files first (beside their final names, then renamed), model.json last: a crash leaves the old record.
    staged = bundle_dir / f".{QUANTIZED_XML}"
    ovf.save_network(network, staged)
    for name, temp in ((QUANTIZED_XML, staged), (QUANTIZED_BIN, staged.with_suffix(".bin"))):
        temp.chmod(0o644)
        temp.replace(bundle_dir / name)
    record = {
        "precision": "int8",
        "format": f"OpenVINO IR ({QUANTIZED_XML} + {QUANTIZED_BIN}): the network, normalised images -> logits",
        "method": f"post-training quantization, nncf.quantize (8-bit symmetric weights and activations): {chosen.name}",
        "chosen_by": {
            "what": "lowest mean KL(fp32 || int8) of the tempered softmax, two-fold on the held-out images "
            "(quantized on half, measured on the other half)",
            "candidates": {c.name: round(d, 6) for c, d in divergence.items()},
        },
        "calibration_images": {
            "images": len(val),
            "views": 2 * len(val),
            **split,
            "what": "each held-out image normalised, and its mirror: the views the served flip TTA feeds the network",
        },
        "temperature": round(temperature, 5),
        "temperature_fitted_on": {
            "images": len(val),
            "objective": f"NLL of the served ({FITTED_FOR_TTA} TTA) INT8 probabilities",
            "temperature_interval_90": temperature_interval(fit_views, val.labels),
            "fp32_temperature": bundle.temperature,
        },
        "test": figures,
        "measured_on": {
            "cpu": cpu_model(),
            "openvino": ovf.openvino_version(),
            "nncf": nncf.__version__,
            "inference_precision": ovf.INFERENCE_PRECISION["int8"],
            "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
        "weights_sha256": bundle.version,
        "files": {name: sha256_of(bundle_dir / name) for name in (QUANTIZED_XML, QUANTIZED_BIN)},
    }
    write_calibration(bundle_dir, record, key=QUANTIZED_KEY)
    load_bundle(bundle_dir)  # what was written verifies
    return record

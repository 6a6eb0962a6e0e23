"""Which runtime runs /predict's forward and at which precision, and why: from the settings, the device
and the bundle's own measurements, never from a guess.

Runtime (``CAMSERVE_RUNTIME``): ``auto`` is OpenVINO on a CPU where it is installed (the forward
compiled once, bench/results/runtimes.md), torch elsewhere: CUDA hosts keep torch, and so does
``CAMSERVE_PRECISION=fp16``, which OpenVINO's CPU plugin does not compute natively here.

Precision on OpenVINO, ``auto``, fastest first:

* ``int8`` when the bundle carries a quantized network and ``model.json`` records that, on the test
  set in the TTA mode being served, its top-1 agreement with fp32 is at least
  :data:`INT8_MIN_AGREEMENT` and its accuracy at most :data:`INT8_MAX_ACCURACY_DROP` below fp32's;
* else ``bf16`` where the CPU computes it natively (AMX or AVX-512 BF16) and the bundle's recorded
  bf16 agreement is at least :data:`~service.inference.torch_engine.MIN_AGREEMENT`;
* else ``fp32``.

The order is measured, not assumed per request: bench/results/runtimes.md times every precision on
this machine side by side. No start-up timing here (the torch engine times its candidates because
bf16 in torch can lose to fp32 where it is emulated; OpenVINO's bf16 is only a candidate where native).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from camcore.bundle import Bundle, BundleError
from service.inference.torch_engine import MIN_AGREEMENT
from service.settings import Settings

INT8_MIN_AGREEMENT = 0.995  # top-1 agreement with the fp32 network on the test set
INT8_MAX_ACCURACY_DROP = 0.003  # 0.3 points of test accuracy


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(settings: Settings, device: torch.device) -> tuple[str, str]:
    """("torch" | "openvino", why)."""
    if settings.runtime == "torch":
        return "torch", "set by CAMSERVE_RUNTIME=torch"
    if settings.runtime == "openvino":
        if device.type != "cpu":
            raise ValueError(f"CAMSERVE_RUNTIME=openvino runs on the CPU; this service runs on {device.type}")
        if not openvino_installed():
            raise ValueError("CAMSERVE_RUNTIME=openvino, but the openvino package is not installed")
        return "openvino", "set by CAMSERVE_RUNTIME=openvino"
    if device.type != "cpu":
        return "torch", f"auto: {device.type} keeps torch"
    if settings.precision == "fp16":
        return "torch", "auto: CAMSERVE_PRECISION=fp16 runs on torch"
    if not openvino_installed():
        if settings.precision == "int8":
            raise ValueError("CAMSERVE_PRECISION=int8 needs the openvino package, which is not installed")
        return "torch", "auto: openvino is not installed"
    return "openvino", "auto: OpenVINO on a CPU (the forward compiled once; bench/results/runtimes.md)"


def int8_figures(bundle: Bundle, tta: str) -> dict[str, Any] | None:
    """model.json's INT8 test figures for one TTA mode, or None where the bundle has no quantized network."""
    record = bundle.metadata.get("quantized")
    if not isinstance(record, dict):
        return None
    figures = (record.get("test") or {}).get(tta)
    return figures if isinstance(figures, dict) else {}


def int8_eligible(bundle: Bundle, tta: str) -> tuple[bool, str]:
    """Whether the bundle's own INT8 measurements allow serving it in this TTA mode, and why (not)."""
    figures = int8_figures(bundle, tta)
    if figures is None:
        return False, "int8: the bundle has no quantized network"
    agreement, accuracy, reference = (figures.get(k) for k in ("agreement", "accuracy", "fp32_accuracy"))
    if not all(isinstance(v, int | float) for v in (agreement, accuracy, reference)):
        return False, f"int8: model.json records no test agreement and accuracies for TTA {tta}"
    drop = reference - accuracy
    said = (
        f"int8 test top-1 agreement with fp32 {agreement:.2%}, accuracy {accuracy:.2%} against fp32's "
        f"{reference:.2%} (TTA {tta}; allowed: agreement at least {INT8_MIN_AGREEMENT:.1%}, accuracy at most "
        f"{INT8_MAX_ACCURACY_DROP * 100:.1f} points lower)"
    )
    ok = agreement >= INT8_MIN_AGREEMENT and drop <= INT8_MAX_ACCURACY_DROP + 1e-9
    return ok, said if ok else f"not eligible: {said}"


def gradcam_precision(bundle: Bundle, requested: str, native_bf16: bool) -> str:
    """The torch precision Grad-CAM runs at beside the OpenVINO engine: the one asked for where torch has it,
    else bf16 where native and the bundle's recorded agreement allows, else fp32. Read, not timed, so every
    worker process agrees without the supervisor timing it."""
    if requested in ("fp32", "bf16"):
        return requested
    bf16 = bundle.metadata.get("precision_agreement", {}).get("bf16")
    return "bf16" if native_bf16 and isinstance(bf16, int | float) and bf16 >= MIN_AGREEMENT else "fp32"


def openvino_precision(bundle: Bundle, requested: str, tta: str, native_bf16: bool) -> tuple[str, str]:
    """The precision the OpenVINO engine serves at, and why. :class:`BundleError` for ``int8`` on a bundle
    without a quantized network (a reload to it keeps the old model)."""
    if requested == "int8":
        if int8_figures(bundle, tta) is None:
            raise BundleError(
                f"{bundle.path}: CAMSERVE_PRECISION=int8, but the bundle has no quantized network "
                "(python -m training quantize writes one)"
            )
        return "int8", "set by CAMSERVE_PRECISION=int8"
    if requested in ("fp32", "bf16"):
        return requested, f"set by CAMSERVE_PRECISION={requested}"
    if requested != "auto":
        raise ValueError(f"the openvino runtime serves fp32, bf16 or int8, not {requested}")
    ok, said = int8_eligible(bundle, tta)
    if ok:
        return "int8", f"auto: {said}"
    reasons = [said]
    bf16 = bundle.metadata.get("precision_agreement", {}).get("bf16")
    if not native_bf16:
        reasons.append("bf16: not native on this CPU (no AMX or AVX-512 BF16)")
    elif not isinstance(bf16, int | float) or bf16 < MIN_AGREEMENT:
        reasons.append(f"bf16: recorded top-1 agreement {bf16 if bf16 is not None else 'not measured'}")
    else:
        return "bf16", f"auto: bf16 native on this CPU, top-1 agreement with fp32 {bf16:.2%}; " + "; ".join(reasons)
    return "fp32", "auto: " + "; ".join(reasons)

"""The one forward recipe compiled by OpenVINO for a CPU: /predict's forward without torch's per-op cost.

:class:`~camcore.forward.ServedForward` stays the recipe's one definition. Its steps are converted from
torch (``openvino.convert_model``) piece by piece and chained into one OpenVINO graph:

1. the views: uint8 images -> normalised images (and their mirrors under flip TTA), ``ServedForward.inputs``;
2. the network: normalised images -> logits, converted from the bundle's fp32 torch network, or read
   from the bundle's INT8 OpenVINO IR (``model_int8.xml``/``.bin``, written by ``python -m training
   quantize``; an IR is XML and raw tensors, so reading it runs no code);
3. the probabilities: logits / temperature, softmax, mean over the views, ``ServedForward.probabilities``.

Pieces rather than one conversion so that the same chain serves fp32, bf16 and int8: the quantized
network is the only piece that differs, and the recipe around it is converted from the same torch code.
Compiled for the CPU with an inference precision (bf16 where the CPU has it natively, else f32), a
number of streams (batches that run at once, each on its share of the cores) and a number of threads.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov
import torch
from torch import nn

from camcore.forward import ServedForward
from camcore.network import CifarResNet

CompiledPrecision = Literal["fp32", "bf16", "int8"]
# INFERENCE_PRECISION_HINT per served precision. int8: the quantized convolutions and matmul run in int8
# whatever the hint; the rest (normalisation, softmax, the dequantised edges) in f32, as the recipe says.
INFERENCE_PRECISION: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INPUT_SHAPE = (3, 32, 32)


def openvino_version() -> str:
    return ov.get_version().split("-")[0]


def native_bf16(cpuinfo: Path | str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX-512 BF16); elsewhere bf16 is emulated, slower than f32."""
    try:
        flags = Path(cpuinfo).read_text(errors="replace").split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


class _Views(nn.Module):
    """Step 1 of the recipe alone, as a module ``convert_model`` can trace."""

    def __init__(self, forward: ServedForward) -> None:
        super().__init__()
        self.recipe = forward

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.recipe.inputs(images)


class _Probabilities(nn.Module):
    """Step 3 of the recipe alone."""

    def __init__(self, forward: ServedForward) -> None:
        super().__init__()
        self.recipe = forward

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.recipe.probabilities(logits)


def _convert(module: nn.Module, example: torch.Tensor, element: ov.Type) -> ov.Model:
    """``convert_model`` with the batch dimension dynamic (any batch size, one compiled model)."""
    shape = ov.PartialShape([-1, *example.shape[1:]])
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # convert_model traces with torch.jit.trace, which warns that it is deprecated; the result is an
        # OpenVINO graph, which is what is kept.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        return ov.convert_model(module.eval(), example_input=example, input=[(shape, element)])


def convert_network(model: CifarResNet) -> ov.Model:
    """The fp32 network (normalised images -> logits) as an OpenVINO model: what INT8 quantization starts from."""
    return _convert(model, torch.zeros(2, *INPUT_SHAPE), ov.Type.f32)


def read_network(xml: Path | str) -> ov.Model:
    """A network saved as OpenVINO IR (its ``.bin`` beside it)."""
    xml = Path(xml)
    return ov.Core().read_model(str(xml), str(xml.with_suffix(".bin")))


def save_network(network: ov.Model, xml: Path | str) -> None:
    """Write ``network`` as IR (``xml`` and its ``.bin``); weights as they are (no fp16 compression)."""
    ov.save_model(network, str(xml), compress_to_fp16=False)


def chain(*models: ov.Model) -> ov.Model:
    """One model: each model's single output feeds the next one's single input. The models are cloned
    first (rewiring changes a graph in place), so each can be chained again."""
    first, *rest = (model.clone() for model in models)
    current = first
    for following in rest:
        (feed,) = [result.input_value(0) for result in current.get_results()]
        (parameter,) = following.get_parameters()
        for target in parameter.output(0).get_target_inputs():
            target.replace_source_output(feed)
        current = ov.Model(following.get_results(), first.get_parameters(), "camserve")
    return current


def served_model(forward: ServedForward, network: ov.Model, *, probabilities: bool = True) -> ov.Model:
    """uint8 (N, 3, 32, 32) images -> the served (N, classes) probabilities, with ``forward``'s views and
    temperature around ``network``; with ``probabilities=False``, the per-view logits (views x N, classes)
    before any temperature, for evaluation and calibration."""
    views = _convert(_Views(forward), torch.zeros(2, *INPUT_SHAPE, dtype=torch.uint8), ov.Type.u8)
    if not probabilities:
        return chain(views, network)
    classes = int(network.output(0).get_partial_shape()[1].get_length())
    post = _convert(_Probabilities(forward), torch.zeros(2 * forward.views, classes), ov.Type.f32)
    return chain(views, network, post)


def compile_served(
    model: ov.Model, precision: CompiledPrecision, *, streams: int = 1, threads: int | None = None
) -> ov.CompiledModel:
    """Compile for this CPU: ``streams`` batches may run at once (one infer request each), over ``threads``
    threads in all (None: OpenVINO's choice)."""
    config: dict[str, object] = {"INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision], "NUM_STREAMS": streams}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", config)


def run(request: ov.InferRequest, images: np.ndarray) -> np.ndarray:
    """One batch through one infer request (never used by two threads at once). The input is shared, not
    copied; the output is a copy (``share_outputs=False``), since the request's own buffer is overwritten by
    its next batch. The GIL is released meanwhile."""
    return request.infer({0: images}, share_inputs=True, share_outputs=False)[0]


def in_batches(compiled: ov.CompiledModel, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    """Run a compiled model over a large uint8 set, batch by batch, on one infer request."""
    request = compiled.create_infer_request()
    out = [run(request, images[i : i + batch_size].numpy()) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)

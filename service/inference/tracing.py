"""One TorchScript trace per recipe per process; every engine after the first gets a copy bound to its own weights.

Each ``torch.jit.trace`` of a module defines new TorchScript types (47 functions for the served forward) in
torch's global compilation unit, which never frees them; and once such a function has run, its executor keeps
memory that grows with the batch: about 100 MB per trace at batch 32, so every hot reload leaked that much
(issue 24: 12 reloads took a server from 738 to 1,626 MiB). Nothing in torch drops one module's functions
while others live (``CompilationUnit.drop_all_functions`` would pull the graph from under the engine still
serving).

So the graph is traced once per *recipe* (device, precision, test-time augmentation, whether a temperature
divides, the names, shapes and dtypes of the tensors the graph reads) and kept here without weights. A
later engine with the same recipe gets ``copy.deepcopy`` of it (same TorchScript types: no new functions)
with every parameter and buffer rebound to its own eager module's tensors, shared rather than copied, so
the old engine keeps answering with its own weights until it is freed. The weights are attributes of the
traced module, never constants of its graph; the temperature is read from a buffer
(``ServedForward.temperature_divisor``) for the same reason. The engine still checks the copy against
eager mode bit for bit before using it.
"""

from __future__ import annotations

import copy
import threading
import warnings
from collections.abc import Hashable

import torch
from torch import nn

_lock = threading.Lock()
_templates: dict[Hashable, torch.jit.ScriptModule] = {}  # recipe -> traced graph holding no weights


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def recipe(forward: nn.Module) -> Hashable:
    """What the traced graph depends on besides tensor values: the Python-level choices it baked in
    (control flow on precision, views and temperature) and the tensors it reads."""
    choices = tuple((name, repr(getattr(forward, name, None))) for name in ("precision", "tta", "dtype"))
    divides = getattr(forward, "temperature", 1.0) != 1.0
    tensors = tuple((name, tuple(t.shape), t.dtype, str(t.device)) for name, t in _tensors(forward))
    return type(forward).__qualname__, choices, divides, tensors


def _bind(traced: torch.jit.ScriptModule, tensors: list[tuple[str, torch.Tensor]]) -> torch.jit.ScriptModule:
    """Point every attribute ``name`` of ``traced`` at the given tensor (no copy)."""
    for name, tensor in tensors:
        *path, leaf = name.split(".")
        owner = traced
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, leaf, tensor)
    return traced


def _trace(forward: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        # Deprecated in favour of torch.compile/torch.export, neither of which runs a whole pass in C++
        # with the GIL released, the point here; if trace goes away, /predict runs eagerly (the engine).
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace", FutureWarning)
        return torch.jit.trace(forward, example, check_trace=False)


def traced_forward(forward: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``forward`` as a traced module reading ``forward``'s own tensors; traced only the first time its recipe
    is seen in this process. Call under ``torch.inference_mode()``, as the engine does."""
    key = recipe(forward)
    with _lock:
        template = _templates.get(key)
        if template is None:
            traced = _trace(forward, example)
            empty = [(name, torch.empty(0, dtype=t.dtype, device=t.device)) for name, t in _tensors(forward)]
            _templates[key] = _bind(copy.deepcopy(traced), empty)
            return traced
        return _bind(copy.deepcopy(template), _tensors(forward))

"""The one forward recipe: uint8 images in, the probabilities the service answers out.

Every place that runs the network goes through :class:`ServedForward`: the service's engine and its
Grad-CAM, the export's evaluation, the benchmark's in-process ceiling and its LitServe peer. The
recipe, in order:

1. normalise with the bundle's mean and std, channels_last;
2. test-time augmentation views: the images, and with ``tta="flip"`` their mirrors, stacked into one
   batch twice the size (one pass over both views, not two passes);
3. the network under autocast at the serving precision, its conv and linear weights stored in that
   precision once (:func:`with_weights_in`), logits back in fp32;
4. logits divided by the bundle's temperature, softmax in fp32, then the mean over the views.

The steps are separate methods so that Grad-CAM, which must split the network at a block, still
runs exactly these steps around its split.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from camcore.network import CifarResNet
from camcore.preprocess import Normalize

if TYPE_CHECKING:
    from camcore.bundle import Bundle

Precision = Literal["fp32", "bf16", "fp16"]
TestTimeAugmentation = Literal["none", "flip"]
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def with_weights_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of ``model`` whose conv and linear parameters are stored in ``dtype``, the rest as it was.

    Autocast casts exactly these to its dtype on every call (its cast cache lasts one autocast
    region); for a lone image that cast was a fifth of the forward pass on a CPU (7.7 ms against
    6.3 ms). Cast once here, with the same rounding, the outputs are bit for bit the same.
    """
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            for name, parameter in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(parameter.detach().to(dtype), requires_grad=False))
    return model


def view_mean_probabilities(logits: torch.Tensor, temperature: float | torch.Tensor | None, views: int) -> torch.Tensor:
    """The recipe's step 4, its one definition: fp32 logits of every view, (views x N, classes), each
    divided by the temperature (None: none), softmaxed, and averaged over the views -> (N, classes)."""
    if temperature is not None:
        logits = logits / temperature
    probabilities = logits.softmax(1)  # outside autocast: always in fp32
    if views == 2:
        original, mirrored = probabilities.chunk(2)
        probabilities = (original + mirrored) / 2
    elif views != 1:
        probabilities = probabilities.unflatten(0, (views, -1)).mean(0)
    return probabilities


class ServedForward(nn.Module):
    """uint8 (N, 3, H, W) images -> float32 (N, classes) probabilities; one module, so it can be traced."""

    def __init__(
        self,
        model: CifarResNet,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        precision: Precision = "fp32",
        tta: TestTimeAugmentation = "none",
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"unknown precision {precision!r}; valid: {list(AUTOCAST_DTYPES)}")
        if tta not in ("none", "flip"):
            raise ValueError(f"unknown test-time augmentation {tta!r}; valid: 'none', 'flip'")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        device = next(model.parameters()).device
        self.precision, self.tta, self.temperature = precision, tta, float(temperature)
        self.dtype = AUTOCAST_DTYPES[precision]
        self.normalize = Normalize(mean, std).to(device)
        self.model = model if self.dtype is None else with_weights_in(model, self.dtype)
        # The divisor as a tensor too, so a trace reads it rather than baking the number into its graph:
        # one traced graph then serves every bundle's temperature (service/inference/tracing.py). Bit for
        # bit the same quotient as dividing by the float (float32 either way).
        self.register_buffer(
            "temperature_divisor", torch.tensor(self.temperature, dtype=torch.float32, device=device), persistent=False
        )

    @classmethod
    def from_bundle(
        cls, bundle: Bundle, *, precision: Precision = "fp32", tta: TestTimeAugmentation = "none"
    ) -> ServedForward:
        """The recipe as the bundle prescribes it: its normalisation and its temperature."""
        return cls(
            bundle.model,
            bundle.mean,
            bundle.std,
            precision=precision,
            tta=tta,
            temperature=bundle.temperature,
        )

    def plain(self) -> ServedForward:
        """The same network at the same precision without TTA views or temperature (what ROAD scores),
        sharing this recipe's already cast weights instead of casting a second copy."""
        plain = copy.copy(self)  # shallow: the submodules (and their weights) are shared
        plain.tta, plain.temperature = "none", 1.0
        return plain

    @property
    def views(self) -> int:
        return 2 if self.tta == "flip" else 1

    # -- the steps, in order ---------------------------------------------------------------------
    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """Steps 1-2: uint8 images -> normalised views, (views x N, 3, H, W), the images first."""
        x = self.normalize(images)
        return torch.cat([x, x.flip(3)]) if self.tta == "flip" else x

    def autocast(self, device_type: str) -> contextlib.AbstractContextManager:
        """Step 3's precision, for callers that run the network in pieces (Grad-CAM)."""
        return torch.autocast(device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Step 4: fp32 logits of every view, (views x N, classes) -> (N, classes) probabilities."""
        divisor = self.temperature_divisor if self.temperature != 1.0 else None
        return view_mean_probabilities(logits, divisor, self.views)

    # -- whole passes ----------------------------------------------------------------------------
    def view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """fp32 logits, (views x N, classes), before temperature: for evaluation and calibration."""
        x = self.inputs(images)
        with self.autocast(x.device.type):
            return self.model(x).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self.view_logits(images))


@torch.inference_mode()
def in_batches(
    forward: ServedForward, images: torch.Tensor, batch_size: int = 500, *, logits: bool = False
) -> torch.Tensor:
    """Run ``forward`` over a large uint8 set in batches; probabilities, or with ``logits`` the
    per-view logits as (views, N, classes). The images move to the forward's device batch by batch."""
    device = next(forward.model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device)
        if logits:
            out.append(forward.view_logits(batch).float().view(forward.views, len(batch), -1).cpu())
        else:
            out.append(forward(batch).cpu())
    return torch.cat(out, dim=1 if logits else 0)

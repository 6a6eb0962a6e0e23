"""Ghost batch normalisation: BatchNorm statistics from virtual batches during training only.

Hoffer et al. (2017) and Page's "How to train your ResNet" (part 8) normalise each virtual batch
of ~32 images with its own statistics while the optimiser still sees the whole batch of 512: the
noisier statistics regularise like a smaller batch without the cost of more steps. At evaluation it
is plain BatchNorm with the same parameters and running statistics, so a trained network's
``state_dict`` loads into the serving network (``camcore.network``) unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GhostBatchNorm2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, virtual_batch_size: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if virtual_batch_size < 2:
            raise ValueError("virtual_batch_size must be at least 2")
        self.virtual_batch_size = virtual_batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        size = self.virtual_batch_size
        if not self.training or n % size != 0 or n == size:
            return super().forward(x)  # evaluation, or a batch that does not split evenly: plain BN
        k = n // size
        # Folding k consecutive images into one "image" of k*c channels puts image r*k + j in virtual
        # batch j; one batch_norm call then normalises every virtual batch on its own.
        folded = x.contiguous().view(size, k * c, h, w)
        running_mean = self.running_mean.repeat(k)
        running_var = self.running_var.repeat(k)
        out = F.batch_norm(
            folded,
            running_mean,
            running_var,
            self.weight.repeat(k),
            self.bias.repeat(k),
            training=True,
            momentum=self.momentum,
            eps=self.eps,
        )
        with torch.no_grad():  # the running statistics: the mean over the virtual batches
            self.running_mean.copy_(running_mean.view(k, c).mean(0))
            self.running_var.copy_(running_var.view(k, c).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(n, c, h, w).contiguous(memory_format=torch.channels_last)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


def use_ghost_batch_norm(module: nn.Module, virtual_batch_size: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` under ``module`` in place, keeping its parameters and statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            ghost = GhostBatchNorm2d(child.num_features, virtual_batch_size, eps=child.eps, momentum=child.momentum).to(
                child.weight.device
            )
            ghost.load_state_dict(child.state_dict())
            setattr(module, name, ghost)
        else:
            use_ghost_batch_norm(child, virtual_batch_size)
    return module

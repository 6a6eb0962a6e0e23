"""The one-cycle learning-rate multiplier used with ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations


def custom_one_cycle_lr(step: int, total_steps: int, warmup_fraction: float = 0.2, floor: float = 0.0) -> float:
    """Linear warm-up from ``floor`` to 1 over ``warmup_fraction`` of training, then linear to ``floor``.

    Page's DAWNBench schedule (peak at epoch 5 of 24); the short, high peak is what lets this
    network train in tens of epochs. Steps past the end stay at ``floor``.
    """
    if total_steps <= 0:
        raise ValueError("total_steps must be positive")
    if not 0.0 < warmup_fraction < 1.0:
        raise ValueError("warmup_fraction must be in (0, 1)")
    peak = warmup_fraction * total_steps
    if step <= peak:
        return floor + (1.0 - floor) * step / peak
    progress = min(1.0, (step - peak) / (total_steps - peak))
    return 1.0 + (floor - 1.0) * progress

"""Learning-rate multipliers per optimizer step: linear warmup, then cosine, poly or constant."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, total: int, name: str, warmup: int, min_ratio: float, power: float) -> float:
    """Factor on the base lr before optimizer step ``step`` (0-based) of ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if name == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return (1 - t) ** power  # poly, as in the paper (SGD, power 0.9)


def make_scheduler(optimizer, cfg, total: int):
    """A ``LambdaLR`` over ``optimizer`` (DeepSpeed steps it once per optimizer step and checkpoints it)."""
    s = cfg.schedule
    return LambdaLR(optimizer, lambda step: lr_factor(step, total, s.name, s.warmup_steps, s.min_lr_ratio, s.power))

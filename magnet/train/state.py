"""The training loop's typed state: :class:`TrainState` (saved in every checkpoint with the data
stream's ``state_dict``), :class:`LossMeter` (named sums over micro-batches and ranks) and the
optimizer's parameter groups."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from magnet import dist


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    best: dict | None = None  # {"metric", "value", "step"} of the best checkpoint
    mlflow_run_id: str | None = None
    corrupt_samples: int = 0  # running total over ranks (data.on_corrupt=skip)
    nonfinite_skips: int = 0  # micro-batches / steps skipped for a non-finite loss or gradient (train.nonfinite_skips)

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, d.get(f.name, f.default))  # fields added later start at their default


class LossMeter:
    """Sums of named values over the micro-batches of an optimizer step; :meth:`reduce` sums them over
    ranks (a collective: every rank adds the same names) and starts afresh."""

    def __init__(self):
        self.sums: dict[str, float] = {}

    def add(self, **values: float) -> None:
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(v)

    def reduce(self) -> dict[str, float]:
        names = sorted(self.sums)
        total = dist.all_reduce_sum(torch.tensor([self.sums[n] for n in names], dtype=torch.float64))
        self.sums = {}
        return dict(zip(names, total.tolist()))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and kernels only; biases, norm scales and other vectors are not decayed
    (the output biases start at the training mean, which decay would pull to zero)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]

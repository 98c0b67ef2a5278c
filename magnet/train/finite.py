"""Finite or nothing: the non-finite loss policy of the training loop and the check before a model is kept.

A micro-batch whose loss is not finite on any rank is skipped on every rank (no backward, no optimizer
update): the ranks agree through one all-reduced flag, since a rank that skipped the backward alone would
leave the others waiting in its collectives. An optimizer step whose global gradient norm is not finite
counts the same where DeepSpeed discarded it (its overflow check); where it applied it, the weights are no
longer finite and training stops at once. ``train.nonfinite_skips`` skips are allowed; the next one stops
training with one line naming the step. A model is written and registered only if its weights, its output on
the reference example and its last evaluation's predictions are all finite.
"""

from __future__ import annotations

import math

import torch

from magnet import dist
from magnet.errors import UserError

ADVICE = "lower optim.lr, or check the training shards for non-finite features"


def finite_everywhere(loss: torch.Tensor) -> bool:
    """True when ``loss`` is finite on every rank (a collective: every rank calls it for every micro-batch)."""
    bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0])
    return dist.all_reduce_sum(bad).item() == 0


def grad_norm_problem(engine) -> str | None:
    """After an optimizer step: None when its global gradient norm is finite (or not computed), else
    "skipped" (DeepSpeed discarded the step) or "applied" (the weights took it). Same answer on every rank."""
    norm = engine.get_global_grad_norm()
    if norm is None or math.isfinite(float(norm)):
        return None
    return "applied" if engine.was_step_applied() else "skipped"


def skip_or_stop(state, limit: int, step: int, what: str) -> None:
    """Count one skip in ``state.nonfinite_skips``; over ``limit``, stop (the same error on every rank)."""
    state.nonfinite_skips += 1
    if state.nonfinite_skips > limit:
        raise UserError(f"config: train.nonfinite_skips: step {step}: {what} is not finite "
                        f"({state.nonfinite_skips - 1} skipped before, at most {limit} allowed); training stopped, "
                        f"nothing registered ({ADVICE})", collective=True)


def stop_applied(step: int) -> None:
    raise UserError(f"config: train.nonfinite_skips: step {step}: a non-finite gradient reached the weights; "
                    f"training stopped, nothing registered ({ADVICE})", collective=True)


def nonfinite_count(arrays) -> int:
    """Non-finite values in tensors or numpy arrays."""
    n = 0
    for a in arrays:
        t = torch.as_tensor(a)
        if t.is_floating_point():
            n += int((~torch.isfinite(t)).sum())
    return n


def check_model(step: int, state_dict: dict, output: dict, eval_metrics: dict) -> None:
    """Refuse to keep a model whose weights, reference output or last evaluation predictions are not finite
    (every rank holds the same values here, so every rank raises alike)."""
    bad = {"weights": nonfinite_count(state_dict.values()), "reference output": nonfinite_count(output.values()),
           "evaluation predictions": int(eval_metrics.get("nonfinite_predictions", 0))}
    found = [f"{n} non-finite value(s) in its {what}" for what, n in bad.items() if n]
    if found:
        raise UserError(f"config: train.nonfinite_skips: step {step}: the model has {'; '.join(found)}; "
                        f"nothing written or registered ({ADVICE})", collective=True)

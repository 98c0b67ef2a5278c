"""The DeepSpeed config dict: ZeRO knobs from ``configs/deepspeed/*.json``, everything else from the experiment.

Micro-batch, accumulation, clipping, precision and optimizer come from the experiment config and
are filled in here before ``deepspeed.initialize(config=dict)``; a JSON file that sets them itself
is refused, so there is one source for each value.
"""

from __future__ import annotations

import json

from magnet.errors import UserError
from magnet.train_config import ExperimentConfig, zero_file

FILLED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "torch_autocast")


def resolve_precision(precision: str, cuda: bool) -> str:
    if precision == "auto":
        return "bf16" if cuda else "fp32"
    return precision


def deepspeed_config(cfg: ExperimentConfig, cuda: bool) -> dict:
    path = zero_file(cfg.train.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno})") from None
    clash = sorted(set(ds) & set(FILLED))
    if clash:
        raise UserError(f"{path}: {clash[0]}: set in the experiment config, not in the ZeRO file")
    o = cfg.optim
    if o.name == "adamw":
        optimizer = {"type": "AdamW", "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps,
                                                  "weight_decay": o.weight_decay}}
        offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload == "none":  # torch's AdamW: no compiled FusedAdam needed (DeepSpeedCPUAdam when offloaded)
            optimizer["params"]["torch_adam"] = True
    else:
        optimizer = {"type": "SGD", "params": {"lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay}}
    precision = resolve_precision(cfg.train.precision, cuda)
    ds.update(
        train_micro_batch_size_per_gpu=cfg.data.micro_batch,
        gradient_accumulation_steps=cfg.train.grad_accum,
        gradient_clipping=o.clip,
        optimizer=optimizer,
        # bf16: autocast over fp32 master weights (DeepSpeed enters it around the forward), so float32
        # batches and norm layers need no casts in the model
        torch_autocast={"enabled": precision == "bf16", "dtype": "bfloat16"},
        bf16={"enabled": False},
        fp16={"enabled": False},
        steps_per_print=10**9,
    )
    return ds

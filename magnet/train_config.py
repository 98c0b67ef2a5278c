"""The experiment config of ``launch/train.py``: one section per concern under one root.

``data`` (shards, batching, workers), ``model`` and ``loss`` (the model's own sections), ``optim``,
``schedule``, ``train`` (steps, precision, DeepSpeed ZeRO file, checkpoints, evaluation) and
``mlflow``. Loaded with :func:`magnet.config.load_config`; the resolved config travels with the
run (run directory, checkpoint client state, MLflow params).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from magnet.errors import UserError
from magnet.loss_config import LossConfig
from magnet.models.config import ModelConfig
from magnet.registry.tracking import refuse_credentials


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Cross-validation: with ``fold=k`` the run trains on every slide whose manifest fold is not ``k``
    and evaluates on the slides of fold ``k``; the manifest's split column is then ignored (those two
    groups take the names ``train_split`` / ``eval_split``). The held-out fold is that fold's test set,
    so it chooses nothing: no best checkpoint is kept by ``train.best_metric`` (magnet/train/loop.py)
    and the model is the last step's weights. ``folds`` records the manifest's ``slide -> fold`` map in
    the run's config (and the registered model's), which is how ``magnet evaluate`` knows the slides a
    fold model trained on. The gene list was chosen by ``magnet shard`` from the statistics of the
    manifest's training split, which may include slides of the held-out fold (the genes, not the model,
    saw them)."""

    shards: str = "shards"  # root written by `magnet shard`; this run reads {shards}/{bin_um}um/
    bin_um: int = 16
    train_split: str = "train"
    eval_split: str = "val"
    fold: int | None = None  # cross-validation fold held out (manifest `folds`); None = the manifest's splits
    folds: dict[str, int] | None = None  # slide -> fold, recorded from the manifest when `fold` is set
    micro_batch: int = 4  # global tiles per micro-batch per rank
    eval_batch: int = 4
    max_bins: int = 256  # bins per tile and batch: a random run of consecutive bins in training, every bin in such chunks in evaluation
    shuffle_buffer: int = 256  # samples (still encoded bytes) held by the shuffle buffer
    shuffle_initial: int = 64  # samples gathered before the buffer starts yielding
    workers: int = 2  # DataLoader workers per rank (0 = in the training process)
    prefetch: int = 2  # batches prefetched per worker
    augment: bool = True  # flips and 90 degree rotations (training only)
    epoch_samples: int = 0  # samples per epoch over all ranks; 0 = the training split's size
    genes: list[str] | None = None  # expected gene list; None = the manifest's (then recorded here)
    normalisation: dict[str, Any] | None = None  # expected normalisation; None = the manifest's (then recorded)
    on_corrupt: Literal["fail", "skip"] = "fail"  # a corrupt shard or sample: stop, or skip it with a warning
    # (counted in the MLflow metric data/corrupt_samples); see magnet/format/reader.py

    def __post_init__(self):
        for name in ("micro_batch", "eval_batch", "max_bins", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be >= 1")
        if self.workers < 0 or self.prefetch < 1:
            raise ValueError("data.workers must be >= 0 and data.prefetch >= 1")


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # the paper: sgd (momentum 0.9) with a poly schedule
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.9  # sgd only
    clip: float = 1.0  # gradient-norm clipping; 0 = off

    def __post_init__(self):  # NaN fails every comparison: each check is written so that NaN is refused
        if not 0 < self.lr < float("inf"):
            raise ValueError(f"optim.lr must be a finite number > 0, got {self.lr}")
        if not (0 <= self.weight_decay < float("inf") and 0 < self.eps < 1 and 0 <= self.clip < float("inf")):
            raise ValueError("optim.weight_decay and optim.clip must be finite and >= 0, optim.eps in (0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas) or not 0 <= self.momentum < 1:
            raise ValueError(f"optim.betas must be two values in [0, 1) and optim.momentum in [0, 1), got {self.betas}")


@dataclasses.dataclass(kw_only=True)
class ScheduleConfig:
    name: Literal["cosine", "poly", "constant"] = "cosine"
    warmup_steps: int = 0  # linear warmup from 0
    min_lr_ratio: float = 0.0  # floor of the cosine as a fraction of optim.lr
    power: float = 0.9  # poly exponent


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    steps: int = 1000  # optimizer steps in all
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on the CPU
    deepspeed: str = "zero2"  # zero1 | zero2 | zero3 | zero2_offload, or a JSON file of ZeRO knobs
    seed: int = 0
    out_dir: str = "runs"
    run_name: str = ""  # "" = a timestamp, decided on rank 0
    log_every: int = 10  # optimizer steps between log lines
    eval_every: int = 0  # optimizer steps between evaluations; 0 = at the end only
    ckpt_every: int = 0  # optimizer steps between checkpoints; 0 = at the end only
    keep_last: int = 3  # step checkpoints kept (the best one is kept apart)
    best_metric: str = "loss"  # evaluation metric that picks the best checkpoint (e.g. pcc_bin)
    best_mode: Literal["min", "max"] = "min"
    progress: bool = True  # tqdm bar on rank 0
    # micro-batches with a non-finite loss (or steps with a non-finite gradient norm) skipped, nothing applied,
    # before training stops with an error at the next one; 0 = stop at the first (docs/reliability.md)
    nonfinite_skips: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.grad_accum < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ValueError("train.steps, train.grad_accum, train.keep_last and train.log_every must be >= 1")
        if self.nonfinite_skips < 0:
            raise ValueError("train.nonfinite_skips must be >= 0")


@dataclasses.dataclass(kw_only=True)
class MlflowConfig:
    enabled: bool = True
    tracking_uri: str = "sqlite:///mlruns.db"  # or http(s)://server; artifacts beside a sqlite file
    experiment: str = "magnet-hd"
    register_as: str = ""  # registered model name; "" = log the model without registering it
    alias: str = ""  # alias set on the new version (e.g. champion); needs register_as
    figure_genes: int = 4  # genes drawn in the predicted-vs-measured maps
    parent_run_id: str = ""  # nest this run under that run (a sweep sets it for each trial)

    def __post_init__(self):  # the config is recorded (run folder, MLflow params, the model): no secrets in it
        refuse_credentials(self.tracking_uri, "mlflow.tracking_uri")


@dataclasses.dataclass(kw_only=True)
class ExperimentConfig:
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mlflow: MlflowConfig = dataclasses.field(default_factory=MlflowConfig)


REPO_ROOT = Path(__file__).resolve().parents[1]


def zero_file(name: str) -> Path:
    """``train.deepspeed`` as a file: a path, or a name in the shipped ``configs/deepspeed``."""
    p = Path(name)
    for cand in (p, REPO_ROOT / "configs" / "deepspeed" / f"{name}.json"):
        if cand.is_file():
            return cand
    raise UserError(f"config: train.deepspeed: no ZeRO config file '{name}' (a path or zero1/zero2/zero3/zero2_offload)")

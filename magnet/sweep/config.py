"""SweepConfig: the base experiment, one shard set per bin resolution, the search space, the search
algorithm, ASHA, resources per trial, MLflow and Ray. Loaded with :func:`magnet.config.load_config`.

The search space mirrors the experiment config (``configs/train/*.yaml``): a leaf is a mapping with
one key naming its distribution, e.g. ``space: {optim: {lr: {loguniform: [1.0e-4, 1.0e-2]}},
data: {bin_um: {grid: [8, 16]}}}``. ``grid`` expands every value (times ``search.num_samples``);
``choice``, ``uniform``, ``loguniform`` and ``randint`` are sampled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from magnet.registry.tracking import refuse_credentials

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclasses.dataclass(kw_only=True)
class SearchConfig:
    algorithm: Literal["random", "grid", "optuna"] = "random"  # optuna only where optuna is installed
    num_samples: int = 1  # samples of the space (each repeats every grid combination)
    metric: str = "val/loss"  # reported at every evaluation: "<eval split>/<metric>"
    mode: Literal["min", "max"] = "min"
    max_concurrent: int = 0  # 0 = as many as the resources allow
    seed: int = 0  # seed of the random search

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent < 0:
            raise ValueError("search.num_samples must be >= 1 and search.max_concurrent >= 0")
        if "/" not in self.metric:
            raise ValueError(f"search.metric must name '<eval split>/<metric>', got {self.metric!r}")


@dataclasses.dataclass(kw_only=True)
class AshaConfig:
    enabled: bool = True
    grace_period: int = 1  # optimizer steps a trial runs before it can be stopped
    reduction_factor: float = 2.0
    brackets: int = 1

    def __post_init__(self):
        if self.grace_period < 1 or self.reduction_factor <= 1 or self.brackets < 1:
            raise ValueError("asha: grace_period >= 1, reduction_factor > 1, brackets >= 1")


@dataclasses.dataclass(kw_only=True)
class ResourcesConfig:
    cpu: float = 1.0  # per trial
    gpu: float = 0.0  # per trial (one worker: DeepSpeed with a world of one)


@dataclasses.dataclass(kw_only=True)
class SweepMlflowConfig:
    tracking_uri: str = "sqlite:///mlruns.db"  # a multi-node sweep needs a server every node reaches
    experiment: str = "magnet-hd-sweeps"
    register_as: str = "magnet-hd"  # the best trial's model is registered under this name
    alias: str = "sweep-best"

    def __post_init__(self):  # recorded in sweep.yaml and the parent run: no secrets in it
        refuse_credentials(self.tracking_uri, "mlflow.tracking_uri")


@dataclasses.dataclass(kw_only=True)
class RayConfig:
    address: str = ""  # "" = a local Ray instance; "auto" = the cluster this node belongs to
    num_cpus: int = 0  # local instance only; 0 = every core
    object_store_mb: int = 0  # local instance only; 0 = Ray's default (30% of RAM)


def check_variants(variants: dict[str, list[str]]) -> None:
    """Each variant is a non-empty list of key=value overrides that leaves the shards to the space."""
    for label, overrides in variants.items():
        if not overrides or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise ValueError(f"variants.{label}: expected a non-empty list of key=value overrides")
        if any(o.split("=", 1)[0].strip() in ("data.bin_um", "data.shards") for o in overrides):
            raise ValueError(f"variants.{label}: data.bin_um and data.shards are set by the space and shards")


@dataclasses.dataclass(kw_only=True)
class SweepConfig:
    name: str = "sweep"
    out_dir: str = "sweeps"  # sweep folder: out_dir/name (Tune state, trial runs, summary); shared on a cluster
    train_config: str = "configs/train/tiny.yaml"  # the base experiment every trial starts from
    train_overrides: list[str] = dataclasses.field(default_factory=list)  # key=value applied to the base
    shards: dict[str, str] = dataclasses.field(default_factory=dict)  # bin_um -> root holding {bin_um}um/
    space: dict[str, Any] = dataclasses.field(default_factory=dict)
    tie: dict[str, str] = dataclasses.field(default_factory=dict)  # experiment key -> swept key whose value it takes
    # in each trial, e.g. {model.seed: train.seed}: one grid axis setting two keys
    variants: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # label -> key=value overrides: the
    # space's key `variant` takes labels, e.g. {magnet_nb: [model.name=magnet, loss.bin=nb]} (several keys per value)
    search: SearchConfig = dataclasses.field(default_factory=SearchConfig)
    asha: AshaConfig = dataclasses.field(default_factory=AshaConfig)
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    mlflow: SweepMlflowConfig = dataclasses.field(default_factory=SweepMlflowConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def __post_init__(self):
        for key in self.shards:
            if not str(key).isdigit():
                raise ValueError(f"shards: key {key!r} is not a bin size in um (e.g. 8)")
        self.shards = {str(k): str(v) for k, v in self.shards.items()}
        check_variants(self.variants)

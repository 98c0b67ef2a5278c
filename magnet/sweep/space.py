"""The search space: leaves of ``space`` as dotted experiment keys, Tune's param space, the checks
made before any trial starts, and the experiment config of one trial."""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any

from magnet.config import load_config
from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.sweep.config import DISTRIBUTIONS, SweepConfig
from magnet.train_config import ExperimentConfig


def leaves(space: dict, prefix: str = "") -> dict[str, tuple[str, list]]:
    """``{"optim": {"lr": {"loguniform": [a, b]}}}`` -> ``{"optim.lr": ("loguniform", [a, b])}``."""
    out: dict[str, tuple[str, list]] = {}
    for name, node in space.items():
        key = f"{prefix}{name}"
        if not isinstance(node, dict) or not node:
            raise UserError(f"config: space.{key}: expected a mapping (a section, or one of {', '.join(DISTRIBUTIONS)})")
        kinds = [k for k in node if k in DISTRIBUTIONS]
        if not kinds:
            out.update(leaves(node, key + "."))
            continue
        if len(node) != 1:
            raise UserError(f"config: space.{key}: a leaf holds exactly one of {', '.join(DISTRIBUTIONS)}")
        kind, values = kinds[0], node[kinds[0]]
        if not isinstance(values, list) or not values:
            raise UserError(f"config: space.{key}.{kind}: expected a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
            raise UserError(f"config: space.{key}.{kind}: expected [low, high]")
        out[key] = (kind, values)
    return out


VARIANT = "variant"  # the space's key whose values are labels of SweepConfig.variants


def overrides_of(cfg: SweepConfig, key: str, value: Any) -> list[str]:
    """The experiment overrides one swept value sets: a variant's list, else ``key=value``."""
    return list(cfg.variants[value]) if key == VARIANT else [f"{key}={json.dumps(value)}"]


def _check_key(key: str, cfg: SweepConfig | None = None) -> None:
    """The dotted key names a field of the experiment config (or is ``variant``, where variants are given)."""
    if key == VARIANT and cfg is not None:
        if not cfg.variants:
            raise UserError(f"config: space.{VARIANT}: no variants given (variants: {{label: [key=value, ...]}})")
        return
    cls: Any = ExperimentConfig
    for part in key.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            raise UserError(f"config: space.{key}: '{part}' is not a key of the experiment config")
        cls = typing.get_type_hints(cls)[part]


def _check_values(cfg: SweepConfig, key: str, kind: str, values: list) -> None:
    """Every value a trial can get is a valid experiment config (a bad one failed inside Ray, mid-sweep)."""
    if kind in ("uniform", "loguniform", "randint"):
        low, high = values
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not low < high:
            raise UserError(f"config: space.{key}.{kind}: expected numbers low < high, got {values}")
        if kind == "loguniform" and not low > 0:
            raise UserError(f"config: space.{key}.loguniform: low must be > 0, got {low}")
    for v in values:
        if key == VARIANT and v not in cfg.variants:
            raise UserError(f"config: space.{key}.{kind}: {v!r} is not a label of variants ({', '.join(cfg.variants)})")
        try:
            load_config(ExperimentConfig, cfg.train_config, [*cfg.train_overrides, *overrides_of(cfg, key, v)])
        except UserError as e:
            raise UserError(f"config: space.{key}.{kind}: {v!r} is not a valid value ({e})") from None


def param_space(cfg: SweepConfig) -> dict[str, Any]:
    """Tune's param space, keyed by dotted experiment keys; every value checked before any trial starts."""
    from ray import tune  # start-up time: the CLI imports this module

    algorithm = cfg.search.algorithm
    out: dict[str, Any] = {}
    if not leaves(cfg.space):
        raise UserError("config: space: empty; a sweep varies at least one key (one run is `magnet train`)")
    for key, (kind, values) in leaves(cfg.space).items():
        _check_key(key, cfg)
        _check_values(cfg, key, kind, values)
        if algorithm == "grid" and kind != "grid":
            raise UserError(f"config: space.{key}: search.algorithm grid needs 'grid' values, got '{kind}'")
        if kind == "grid":
            out[key] = tune.choice(values) if algorithm == "optuna" else tune.grid_search(values)
        elif kind == "choice":
            out[key] = tune.choice(values)
        elif kind == "randint":
            out[key] = tune.randint(int(values[0]), int(values[1]) + 1)  # inclusive high
        else:
            out[key] = getattr(tune, kind)(float(values[0]), float(values[1]))
    for key, source in cfg.tie.items():
        _check_key(key)
        if source not in out:
            raise UserError(f"config: tie.{key}: '{source}' is not a key of the search space")
        if key in out:
            raise UserError(f"config: tie.{key}: is a key of the search space itself")
    return out


def base_config(cfg: SweepConfig) -> ExperimentConfig:
    return load_config(ExperimentConfig, cfg.train_config, cfg.train_overrides)


def resolutions(cfg: SweepConfig, base: ExperimentConfig) -> list[int]:
    """Bin sizes the sweep can visit: the space's ``data.bin_um`` values, else the base config's."""
    spec = leaves(cfg.space).get("data.bin_um")
    if spec is None:
        return [base.data.bin_um]
    kind, values = spec
    if kind not in ("grid", "choice"):
        raise UserError(f"config: space.data.bin_um: use grid or choice, not {kind}")
    return [int(v) for v in values]


def check_resolutions(cfg: SweepConfig, base: ExperimentConfig, origin: str) -> None:
    """Refuse, before any trial starts, a resolution without a shard set."""
    for bin_um in resolutions(cfg, base):
        root = cfg.shards.get(str(bin_um))
        if root is None:
            raise UserError(f"{origin}: shards.{bin_um}: no shard set for bin_um {bin_um} in the search space")
        path = manifest_path(root, bin_um)
        if not path.is_file():
            raise UserError(f"{origin}: shards.{bin_um}: no shard set at {path.parent} (manifest.json missing)")
        Manifest.load(path)  # readable, with its fields: not a failure in every trial


def check_no_fold(cfg: SweepConfig, base: ExperimentConfig, origin: str) -> None:
    """Refuse ``data.fold`` (in the base experiment or the space): Tune would pick trials by their scores
    on the held-out fold, which then no longer measures held-out slides."""
    why = ("a sweep picks trials by their evaluation, which data.fold makes the held-out fold; sweep on the "
           "train/val split, then cross-validate the chosen values")
    if "data.fold" in leaves(cfg.space):
        raise UserError(f"{origin}: space.data.fold: {why}")
    if base.data.fold is not None:
        overridden = any(o.split("=", 1)[0].strip() == "data.fold" for o in cfg.train_overrides)
        where = f"{origin}: train_overrides: data.fold" if overridden else f"{cfg.train_config}: data.fold"
        raise UserError(f"{where}: is {base.data.fold}; {why}")


def trial_config(cfg: SweepConfig, params: dict[str, Any], run_root: Path, run_name: str,
                 parent_run_id: str) -> ExperimentConfig:
    """The base experiment with the trial's values, its resolution's shards, and MLflow as a child run."""
    trial = [o for k, v in params.items() for o in overrides_of(cfg, k, v)]
    trial += [f"{k}={json.dumps(params[source])}" for k, source in cfg.tie.items()]
    bin_um = int(params.get("data.bin_um", base_config(cfg).data.bin_um))
    m = cfg.mlflow
    fixed = [f"data.shards={json.dumps(cfg.shards[str(bin_um)])}", f"train.out_dir={json.dumps(str(run_root))}",
             f"train.run_name={json.dumps(run_name)}", "train.progress=false", "mlflow.enabled=true",
             f"mlflow.tracking_uri={json.dumps(m.tracking_uri)}", f"mlflow.experiment={json.dumps(m.experiment)}",
             "mlflow.register_as=", "mlflow.alias=", f"mlflow.parent_run_id={json.dumps(parent_run_id)}"]
    return load_config(ExperimentConfig, cfg.train_config, [*cfg.train_overrides, *trial, *fixed])

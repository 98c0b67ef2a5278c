"""The sweep driver: checks, Ray, the MLflow parent run, the Tuner (new or restored), then the results.

Layout of ``out_dir/name``: Tune's experiment state and trial folders, ``runs/<trial id>/`` (each
trial's training run), ``sweep.yaml`` (resolved config), ``sweep.json`` (the parent run id),
``summary.csv``, ``summary.md`` and ``metric_vs_params.png`` (also artifacts of the parent run).
``sweep.json`` gains the summary once the sweep has finished: ``--resume`` then has nothing to do.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from magnet.config import git_revision, save_config, to_dict
from magnet.errors import UserError
from magnet.io import atomic_write_text, check_not_input
from magnet.registry.tracking import Tracker, absolute_tracking_uri, check_tracking_uri
from magnet.sweep.config import SweepConfig
from magnet.sweep.space import base_config, check_no_fold, check_resolutions, param_space
from magnet.train_config import MlflowConfig

STATE_FILE = "sweep.json"


def absolute_paths(cfg: SweepConfig) -> SweepConfig:
    """Paths as absolute ones: trials run in Ray workers whose working directory is not the caller's."""
    uri = absolute_tracking_uri(cfg.mlflow.tracking_uri)
    return dataclasses.replace(
        cfg, out_dir=str(Path(cfg.out_dir).resolve()), train_config=str(Path(cfg.train_config).resolve()),
        shards={k: str(Path(v).resolve()) for k, v in cfg.shards.items()},
        mlflow=dataclasses.replace(cfg.mlflow, tracking_uri=uri),
    )


# what may change on --resume: where and how many trials run at a time, not what they train
RESUME_MAY_CHANGE = ("ray", "resources", "search.max_concurrent")


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_leaves(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_sweep(cfg: SweepConfig, base, sweep_dir: Path) -> None:
    """Refuse --resume with a config whose trials differ from the recorded ones (``sweep.yaml``: the sweep
    config and the trials' base experiment): Tune restores the recorded trials, so the results would be the
    old trials' under the new config's name."""
    recorded = yaml.safe_load((sweep_dir / "sweep.yaml").read_text())
    for section, now, then in (("", to_dict(cfg), recorded["config"]),
                               ("train_config ", to_dict(base), recorded.get("base", to_dict(base)))):
        now, then = _leaves(json.loads(json.dumps(now))), _leaves(json.loads(json.dumps(then)))
        for key in sorted(set(now) | set(then)):
            if section or not key.startswith(RESUME_MAY_CHANGE):
                if now.get(key) != then.get(key):
                    raise UserError(f"{sweep_dir / 'sweep.yaml'}: {section}{key}: {now.get(key)!r} now, "
                                    f"{then.get(key)!r} when the sweep started; --resume continues the same "
                                    f"trials (use another name for other ones)")


def _trial_name(trial) -> str:
    return trial.trial_id


def _scheduler(cfg: SweepConfig, last_step: int, sweep_dir: Path):
    if not cfg.asha.enabled:
        return None
    from magnet.sweep.scheduler import SweepASHA  # start-up time: the CLI imports this module

    a = cfg.asha
    return SweepASHA(last_step=last_step, sweep_dir=str(sweep_dir), grace_period=a.grace_period,
                     reduction_factor=a.reduction_factor, brackets=a.brackets)


def _search_alg(cfg: SweepConfig):
    """The search algorithm, limited to ``search.max_concurrent`` trials at a time (Tune ignores
    ``TuneConfig.max_concurrent_trials`` for a BasicVariantGenerator passed as ``search_alg``)."""
    s = cfg.search
    if s.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch  # start-up time: the CLI imports this module

            searcher = OptunaSearch(seed=s.seed)
        except (ImportError, AssertionError):
            raise UserError("config: search.algorithm: optuna is not installed (pip install optuna), "
                            "use random or grid") from None
        from ray.tune.search import ConcurrencyLimiter  # start-up time: the CLI imports this module

        return ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent) if s.max_concurrent else searcher
    from ray.tune.search import BasicVariantGenerator  # start-up time: the CLI imports this module

    return BasicVariantGenerator(random_state=s.seed, max_concurrent=s.max_concurrent)


def _init_ray(cfg: SweepConfig) -> bool:
    """Start (or join) Ray; True if this call started it."""
    import ray  # start-up time: the CLI imports this module

    if ray.is_initialized():
        return False
    r = cfg.ray
    if r.address:
        ray.init(address=r.address)
    else:  # address="local": a Ray instance of its own, never a cluster already running on this machine
        ray.init(address="local", num_cpus=r.num_cpus or None,
                 object_store_memory=r.object_store_mb * 2**20 if r.object_store_mb else None)
    return True


def run_sweep(cfg: SweepConfig, origin: str, resume: bool = False) -> dict:
    """Run (or with ``resume`` continue) the sweep; returns the summary of :func:`finish_sweep` (for a
    sweep that had finished already: its saved summary, with ``already_finished``)."""
    cfg = absolute_paths(cfg)
    check_not_input(Path(cfg.out_dir) / cfg.name, "name", [("train_config", cfg.train_config),
                                                           *((f"shards.{k}", v) for k, v in cfg.shards.items())])
    check_tracking_uri(cfg.mlflow.tracking_uri, "mlflow.tracking_uri", existing=False)
    base = base_config(cfg)
    check_no_fold(cfg, base, origin)
    space = param_space(cfg)  # every value checked: nothing may fail inside Ray for want of a check here
    check_resolutions(cfg, base, origin)
    sweep_dir = Path(cfg.out_dir) / cfg.name
    state = sweep_dir / STATE_FILE
    if resume and not state.is_file():
        raise UserError(f"{sweep_dir}: name: no sweep to resume here")
    if not resume and state.is_file():
        raise UserError(f"{sweep_dir}: name: a sweep of this name exists; pass --resume or another name")
    saved = json.loads(state.read_text()) if resume else {}
    if resume:
        check_same_sweep(cfg, base, sweep_dir)
    if "finished" in saved:  # a restore would run no trial and log the same results again
        return {**saved["finished"], "already_finished": True}

    from ray import tune  # start-up time: the CLI imports this module

    # start-up time: the CLI imports this module
    from magnet.sweep.results import close_interrupted, finish_sweep
    from magnet.sweep.trial import run_trial

    m = cfg.mlflow
    tracker = Tracker(MlflowConfig(tracking_uri=m.tracking_uri, experiment=m.experiment, register_as=m.register_as,
                                   alias=m.alias), True)
    parent_id = tracker.start(cfg.name, to_dict(cfg), run_id=saved.get("parent_run_id"),
                              tags={"sweep_dir": sweep_dir, "git_revision": git_revision(), "sweep.role": "parent"})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        save_config(cfg, sweep_dir / "sweep.yaml", base=to_dict(base))
        atomic_write_text(state, json.dumps({"parent_run_id": parent_id}))
    started = _init_ray(cfg)
    try:
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, sweep=cfg, sweep_dir=str(sweep_dir), parent_run_id=parent_id),
            {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
        if resume:
            close_interrupted(cfg.mlflow.tracking_uri, parent_id)
            # resume_unfinished: the trials that were running (or pending) when the sweep was killed run
            # again from their run's latest DeepSpeed checkpoint (trial.py); terminated trials are
            # kept as they are. resume_errored / restart_errored off: a trial that failed keeps its error
            # (it would fail again with the same values) and is reported as failed.
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
        else:
            s = cfg.search
            tuner = tune.Tuner(
                trainable, param_space=space,
                tune_config=tune.TuneConfig(
                    metric=s.metric, mode=s.mode, search_alg=_search_alg(cfg), scheduler=_scheduler(cfg, base.train.steps, sweep_dir),
                    num_samples=s.num_samples,
                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
                # no num_to_keep: every Tune checkpoint is kept (a few bytes each: trial.json); with it, Tune
                # deletes the one its last saved state names before it saves the next state, and a sweep
                # killed between the two cannot restore that trial
                run_config=tune.RunConfig(
                    name=cfg.name, storage_path=cfg.out_dir, verbose=1,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)),
            )
        grid = tuner.fit()
        summary = finish_sweep(grid, cfg, base, parent_id, sweep_dir, tracker)
    except BaseException:
        tracker.finish("KILLED")
        raise
    finally:
        if started:
            import ray  # start-up time: the CLI imports this module

            ray.shutdown()
    tracker.finish()
    finished = {k: summary[k] for k in ("sweep_dir", "parent_run_id", "counts", "best")}
    atomic_write_text(state, json.dumps({"parent_run_id": parent_id, "finished": finished}))
    return summary

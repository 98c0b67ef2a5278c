"""The training loop behind ``launch/train.py``: one DeepSpeed engine per rank over the shard stream.

Small parts: :func:`setup_run` and :func:`write_run_config` (the run folder), :func:`build_engine`,
:func:`train_step`, :func:`evaluate_step`, :func:`save_checkpoint`; the state is a
:class:`magnet.train.state.TrainState` plus the data stream's ``state_dict`` (its position).

Run layout (``train.out_dir/run_name``): ``config.yaml`` (resolved), ``metrics.jsonl`` (one line per
optimizer step and per evaluation, rank 0), ``checkpoints/`` (DeepSpeed tags, ``latest``, ``best``),
``model/`` (the registry model's files). Run name and resume point are decided on rank 0 and
broadcast. Each micro-step reseeds torch from (seed, rank, step, micro-batch), so a resumed run
draws the same dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from magnet import dist
from magnet.batch import collate
from magnet.config import config_from_saved, git_revision, load_yaml, save_config, to_dict
from magnet.data.pipeline import EvalStream, ShardSet, TrainStream
from magnet.data.transforms import chunk_bins
from magnet.errors import UserError
from magnet.io import atomic_write_text, check_not_input
from magnet.losses import compute_loss
from magnet.models.counts import for_loss
from magnet.models.factory import create_model
from magnet.models.init import init_from_statistics, training_statistics
from magnet.registry.tracking import Tracker, mask_credentials
from magnet.train import checkpoint, finite, rundir
from magnet.train.ds_config import deepspeed_config
from magnet.train.figures import gene_maps, loss_curves
from magnet.train.schedule import make_scheduler
from magnet.train.state import LossMeter, TrainState, param_groups
from magnet.train.validation import evaluate
from magnet.train_config import ExperimentConfig


def _run_dir(cfg: ExperimentConfig, resume: str | None) -> tuple[Path, str | None]:
    """(run directory, checkpoint tag to resume or None); called on rank 0 only."""
    out = Path(cfg.train.out_dir)
    if resume is None:
        name = cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S")
        run = out / name
        check_not_input(run, "train.run_name", [("data.shards", cfg.data.shards)])
        rundir.refuse_if_owned(run)
        if checkpoint.read_pointer(run / "checkpoints") is not None:
            raise UserError(f"{run}: train.run_name: this run has checkpoints; pass --resume latest or another name")
        return run, None
    if resume == "latest":
        if cfg.train.run_name:
            candidates = [out / cfg.train.run_name]
        else:
            candidates = sorted(out.glob("*/checkpoints/latest"), key=lambda p: p.stat().st_mtime)
            candidates = [p.parent.parent for p in candidates[-1:]]
    else:
        p = Path(resume)
        candidates = [p.parent if p.name == "checkpoints" else p]
    for run in candidates:
        tag = checkpoint.read_pointer(run / "checkpoints")
        if tag is not None:
            rundir.refuse_if_owned(run)
            return run, tag
    raise UserError(f"--resume {resume}: no checkpoint found under {candidates[0] if candidates else out}")


def _micro_seed(seed: int, rank: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step, micro]).generate_state(1)[0])


def tracked(values: dict, prefix: str = "") -> dict:
    """The numeric values, named with ``prefix``: what MLflow logs and a sweep trial reports to Tune."""
    return {f"{prefix}{k}": v for k, v in values.items() if isinstance(v, (int, float))}


class MetricsLog:
    """Append-only JSON lines on rank 0, mirrored to MLflow (``kind`` "train", or the evaluation
    split, whose metrics get that prefix: ``val/pcc_bin``)."""

    def __init__(self, path: Path, tracker: Tracker, active: bool):
        self.path, self.tracker, self.active = path, tracker, active

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        prefix = "" if kind == "train" else f"{kind}/"
        self.tracker.log_metrics(tracked(values, prefix), step)

    def truncate_after(self, step: int) -> None:
        """Drop rows a killed run wrote after the checkpoint being resumed (they are redone)."""
        if self.active and self.path.is_file():
            keep = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
            atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def read(self, kind: str) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        return [r for r in rows if r["kind"] == kind]


def setup_run(cfg: ExperimentConfig, resume: str | None, world) -> tuple[Path, str | None]:
    """The run folder and the checkpoint tag to resume (None: a new run), decided on rank 0 and broadcast;
    a resumed run's recorded expectations (fold, genes, normalisation, folds) are checked and adopted."""
    decided = None
    if dist.is_primary():
        try:
            rundir.check_writable(Path(cfg.train.out_dir), "train.out_dir")
            decided = _run_dir(cfg, resume)
            rundir.acquire(decided[0])  # before anything is written there
        except UserError as e:  # every rank must learn of it, or the others wait in the broadcast
            decided = str(e)
    decided = dist.broadcast_object(decided)
    if isinstance(decided, str):
        raise UserError(decided, collective=True)
    run_dir, tag = decided
    if tag is not None:  # expectations recorded by the run being resumed
        saved = config_from_saved(ExperimentConfig, run_dir / "config.yaml")
        _check_world_size(run_dir / "config.yaml", world.world_size)
        cfg.data.genes = cfg.data.genes if cfg.data.genes is not None else saved.data.genes
        cfg.data.normalisation = cfg.data.normalisation if cfg.data.normalisation is not None else saved.data.normalisation
        cfg.data.folds = cfg.data.folds if cfg.data.folds is not None else saved.data.folds
        rundir.check_resume(to_dict(saved), to_dict(cfg), run_dir / "config.yaml")  # e.g. another data.fold
    return run_dir, tag


def _check_world_size(path: Path, world_size: int) -> None:
    """A ZeRO checkpoint is partitioned over the ranks that wrote it, and each rank's data position is its own."""
    saved = load_yaml(path).get("world_size")
    if saved is not None and int(saved) != world_size:
        raise UserError(f"{path}: world_size: the run was trained by {saved} processes; resuming with {world_size} "
                        f"would not match its checkpoint (resume with {saved} processes, e.g. --nproc {saved})",
                        collective=True)


def write_run_config(cfg: ExperimentConfig, run_dir: Path, world) -> None:
    """``checkpoints/`` and the resolved ``config.yaml`` (rank 0), then every rank waits."""
    if dist.is_primary():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml", world_size=world.world_size)
    dist.barrier()


def build_engine(cfg: ExperimentConfig, shard_set: ShardSet, fresh: bool):
    """The model and its DeepSpeed engine; biases and norms are not weight-decayed (:func:`param_groups`)."""
    import deepspeed  # start-up time: a bad config fails before deepspeed (1.5 s) loads

    torch.manual_seed(cfg.train.seed)
    model = for_loss(lambda width: create_model(cfg.model, width, shard_set.manifest.feat_dim, shard_set.geometry),
                     cfg.loss, len(shard_set.genes), shard_set.normalisation, str(shard_set.manifest.path))
    raw = shard_set.manifest.extra.get("raw_counts") or {}
    for level, likelihood in cfg.loss.levels().items():
        member, noun = {"bin": ("counts", "bins"), "spot": ("spot_counts", "spot cells"),
                        "glob": ("global_counts", "tiles")}[level]
        if member not in raw:  # spot and tile counts: shards written with keep_counts before they were added lack them
            raise UserError(f"{shard_set.manifest.path}: raw_counts: loss.{level} {likelihood} needs the raw counts "
                            f"of the {noun} in the shards (shard them again with shard.keep_counts: true)")
    if cfg.model.init_from_data and fresh:  # the same statistics on every rank; a resumed run loads its own
        init_from_statistics(model, training_statistics(shard_set, cfg.data.train_split, cfg.data.on_corrupt))
    if getattr(model, "fitted", False) and fresh:  # closed form (model.name=ridge): fitted here, no SGD step
        fit = model.fit(shard_set, cfg.data)
        if dist.is_primary():
            print(f"magnet train: {cfg.model.name} fitted: {fit}", flush=True)
    ds_cfg = deepspeed_config(cfg, torch.cuda.is_available())
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.optim.weight_decay), config=ds_cfg,
        lr_scheduler=lambda opt: make_scheduler(opt, cfg, cfg.train.steps),
    )
    return engine, ds_cfg.get("zero_optimization", {}).get("stage", 0)


def train_step(engine, batch, cfg: ExperimentConfig, meter: LossMeter) -> bool | None:
    """Forward, backward and (at an accumulation boundary) the optimizer step of one micro-batch; its loss
    parts go to ``meter``. True at the boundary; None: its loss is not finite on some rank, so every rank
    skipped its backward and step (:mod:`magnet.train.finite`)."""
    n_bins, skipped = batch.num_bins, batch.corrupt_samples
    batch = batch.to(engine.device)
    engine.train()
    total, parts = compute_loss(engine(batch), batch, cfg.loss)
    if not finite.finite_everywhere(total):
        return None
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(total)
    engine.step()
    meter.add(loss=float(total.detach()), micro_batches=1, bins=n_bins, corrupt_samples=skipped,
              **{k: float(v) for k, v in parts.items()})
    return boundary


def step_row(sums: dict[str, float], state: TrainState, engine, epoch: int) -> dict:
    """The metrics row of an optimizer step from the summed meter: means per micro-batch."""
    n = sums.pop("micro_batches")
    sums.pop("bins")
    state.corrupt_samples += int(sums.pop("corrupt_samples"))
    return {"loss": sums.pop("loss") / n, "lr": engine.get_lr()[0], "epoch": epoch,
            "data/corrupt_samples": state.corrupt_samples, "nonfinite_skips": state.nonfinite_skips,
            **{k: v / n for k, v in sums.items()}}


def evaluate_step(engine, evaluator, cfg: ExperimentConfig, step: int, spare_batch, zero3: bool, log: MetricsLog,
                  tracker: Tracker, genes: list[str]) -> dict:
    """Evaluate on the evaluation split; metrics logged, table and gene maps to MLflow."""
    metrics, table, maps = evaluate(engine, evaluator, cfg, spare_batch, zero3, cfg.mlflow.figure_genes)
    log.write(cfg.data.eval_split, step, metrics)
    _log_eval_artifacts(tracker, step, table, maps, genes)
    return metrics


def save_checkpoint(engine, ckpt_dir: Path, state: TrainState, stream: TrainStream, cfg: ExperimentConfig,
                    best: bool = False) -> None:
    """The engine plus the client state: :class:`TrainState`, the data stream's position, the config."""
    client = {"train_state": state.state_dict(), "data": stream.state_dict(), "config": to_dict(cfg),
              "git_revision": git_revision()}
    if best:
        checkpoint.save_best(engine, ckpt_dir, state.step, client)
    else:
        checkpoint.save(engine, ckpt_dir, state.step, client, cfg.train.keep_last)


def train(cfg: ExperimentConfig, resume: str | None = None, report=None) -> dict:
    """Train to ``cfg.train.steps``; returns a summary (rank 0: final metrics, model URI and version).

    ``report(step, metrics)``, if given, is called after every evaluation once that step's checkpoint
    (if any) is saved, with the metrics prefixed by the evaluation split (``val/loss``): a Ray Tune
    trial reports them (and the run directory as its checkpoint) to the scheduler.
    """
    world = dist.init()
    primary = dist.is_primary()
    run_dir, tag = setup_run(cfg, resume, world)
    shard_set = ShardSet.for_training(cfg.data, cfg.model.bin_input, cfg.model.field)
    cfg.data.genes, cfg.data.normalisation, cfg.data.folds = shard_set.genes, shard_set.normalisation, shard_set.folds
    write_run_config(cfg, run_dir, world)
    ckpt_dir = run_dir / "checkpoints"
    engine, zero_stage = build_engine(cfg, shard_set, fresh=tag is None)

    knn = {"k_bin": cfg.model.k_bin, "k_spot": cfg.model.k_spot, "k_global": cfg.model.k_global}
    stream = TrainStream(shard_set, cfg.data, world, cfg.train.seed, knn)
    state = TrainState()
    if tag is not None:
        client = checkpoint.load(engine, ckpt_dir, tag)
        state.load_state_dict(client["train_state"])
        stream.load_state_dict(client["data"])

    tracker = Tracker(cfg.mlflow, primary)
    try:
        return _train(cfg, world, run_dir, tag is None, engine, zero_stage, shard_set, stream, state, tracker, report)
    except BaseException as e:  # a crash, a stop or a kill is not a finished run in MLflow
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


def _train(cfg, world, run_dir, fresh, engine, zero_stage, shard_set, stream, state, tracker, report) -> dict:
    primary, ckpt_dir = dist.is_primary(), run_dir / "checkpoints"
    knn = {"k_bin": cfg.model.k_bin, "k_spot": cfg.model.k_spot, "k_global": cfg.model.k_global}
    state.mlflow_run_id = tracker.start(
        run_dir.name, to_dict(cfg), run_id=state.mlflow_run_id,
        tags={"run_dir": str(run_dir.resolve()), "checkpoints": str(ckpt_dir.resolve()), "git_revision": git_revision(),
              "world_size": world.world_size, "zero_stage": zero_stage, "tracking_uri": mask_credentials(cfg.mlflow.tracking_uri)},
    )
    if fresh:
        tracker.log_text("\n".join(shard_set.genes) + "\n", "genes.txt")
    log = MetricsLog(run_dir / "metrics.jsonl", tracker, primary)
    log.truncate_after(state.step)
    has_eval = shard_set.manifest.has_split(cfg.data.eval_split)
    evaluator = EvalStream(shard_set, cfg.data, world, cfg.data.eval_split, knn) if has_eval else None
    if primary:
        print(f"magnet train: run {run_dir} | world {world.world_size} | ZeRO-{zero_stage} | "
              f"{stream.batches_per_epoch} micro-batches per epoch per rank | stages {' > '.join(n for n, _ in stream.stages(0))}",
              flush=True)

    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not (primary and cfg.train.progress),
               file=sys.stderr, dynamic_ncols=True)
    meter = LossMeter()
    last_batch = None
    t_start, steps_at_start, t_log, bins_log = time.time(), state.step, time.time(), 0.0
    cpu_start = time.process_time()  # this rank's CPU seconds (all its threads), for learning curves against compute
    metrics: dict = {}
    ckpt_step = -1
    micro = 0
    batches = iter(stream)
    fitted = getattr(engine.module, "fitted", False)
    while state.step < cfg.train.steps and not fitted:
        batch = next(batches)
        torch.manual_seed(_micro_seed(cfg.train.seed, world.rank, state.step, micro))
        last_batch = batch
        micro += 1
        boundary = train_step(engine, batch, cfg, meter)
        if boundary is None:
            finite.skip_or_stop(state, cfg.train.nonfinite_skips, state.step + 1, "the training loss")
            continue
        if not boundary:
            continue
        state.step += 1
        micro = 0
        step = state.step
        problem = finite.grad_norm_problem(engine)
        if problem == "applied":
            finite.stop_applied(step)
        if problem == "skipped":
            finite.skip_or_stop(state, cfg.train.nonfinite_skips, step, "the gradient norm")
        sums = meter.reduce()
        now = time.time()
        bins_log += sums["bins"]
        row = step_row(sums, state, engine, stream.position["epoch"])
        row["cpu_s"] = time.process_time() - cpu_start  # since this process started training (resets on resume)
        bar.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rate = bins_log / max(now - t_log, 1e-9)
            eta = (now - t_start) / max(step - steps_at_start, 1) * (cfg.train.steps - step)
            row["bins_per_s"] = rate
            if primary:
                bar.write(f"step {step}/{cfg.train.steps} loss {row['loss']:.4f} lr {row['lr']:.2e} "
                          f"{rate:,.0f} bins/s eta {_hms(eta)}")
            t_log, bins_log = now, 0.0
        log.write("train", step, row)
        done = step >= cfg.train.steps
        evaluated = evaluator is not None and (done or (cfg.train.eval_every and step % cfg.train.eval_every == 0))
        if evaluated:
            metrics = evaluate_step(engine, evaluator, cfg, step, last_batch, zero_stage == 3, log, tracker,
                                    shard_set.genes)
            if primary:
                bar.write(f"eval step {step}: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                          if isinstance(v, float)))
            if cfg.data.fold is None:
                _maybe_best(engine, ckpt_dir, cfg, metrics, state, stream)
            # else: the held-out fold is this fold's test set, so its metrics (logged above) pick no
            # checkpoint; the model is the last step's weights, as for every run (_finish)
        if done or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0):
            save_checkpoint(engine, ckpt_dir, state, stream, cfg)
            ckpt_step = step
            if primary:
                bar.write(f"checkpoint saved step {step}: {ckpt_dir / checkpoint.step_tag(step)}")
                sys.stdout.flush()
        if report is not None and evaluated:
            report(step, tracked(metrics, f"{cfg.data.eval_split}/"))
    bar.close()
    if fitted:  # a fitted model (model.name=ridge) is evaluated and checkpointed once, at step 0
        if evaluator is not None:
            metrics = evaluate_step(engine, evaluator, cfg, state.step, None, zero_stage == 3, log, tracker,
                                    shard_set.genes)
        save_checkpoint(engine, ckpt_dir, state, stream, cfg)
        ckpt_step = state.step
        if report is not None and metrics:
            report(state.step, tracked(metrics, f"{cfg.data.eval_split}/"))
    summary = {"run_dir": str(run_dir), "step": state.step, "metrics": metrics, "checkpoint_step": ckpt_step}
    summary.update(_finish(engine, cfg, shard_set, tracker, log, run_dir, primary, state.step, metrics))
    tracker.finish()
    dist.barrier()
    dist.release_shm()
    if primary:
        rundir.release(run_dir)
    return summary


def _maybe_best(engine, ckpt_dir: Path, cfg: ExperimentConfig, metrics: dict, state: TrainState,
                stream: TrainStream) -> None:
    name = cfg.train.best_metric
    if name not in metrics:
        raise UserError(f"config: train.best_metric: '{name}' is not an evaluation metric; known: {', '.join(sorted(metrics))}")
    value, best = float(metrics[name]), state.best
    better = best is None or (value > best["value"] if cfg.train.best_mode == "max" else value < best["value"])
    if not better or math.isnan(value):
        return
    state.best = {"metric": name, "value": value, "step": state.step}
    save_checkpoint(engine, ckpt_dir, state, stream, cfg, best=True)


def _log_eval_artifacts(tracker: Tracker, step: int, table: dict, maps, genes: list[str]) -> None:
    if not tracker.active:
        return
    if table:
        tracker.log_table(table, f"eval/step{step:08d}.json")
    if maps is not None:
        fig = gene_maps(maps["pos"], maps["pred"], maps["true"], genes, maps["slide"])
        tracker.log_figure(fig, f"figures/gene_maps_step{step:08d}.png")


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def full_state_dict(engine) -> dict:
    """The whole model's weights on every rank (ZeRO-3 gathers its partitions; a collective)."""
    import deepspeed  # start-up time: a bad config fails before deepspeed (1.5 s) loads

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _finish(engine, cfg, shard_set, tracker: Tracker, log: MetricsLog, run_dir: Path, primary: bool, step: int,
            metrics: dict) -> dict:
    """Figures and the registry model (rank 0), only if its weights, reference output and last evaluation's
    predictions are finite. The weight gather and the reference forward on the example input run on every rank
    (collectives under ZeRO-3)."""
    # start-up time: mlflow (about 1 s, and a warning on stderr) loads when the model is written, not on every start
    from magnet.registry.pyfunc import MagnetPyfunc, model_input, signature, write_model_files

    state_dict = full_state_dict(engine)
    sample = example_sample(shard_set, cfg)
    m = cfg.model
    batch = collate([sample], shard_set.geometry, k_bin=m.k_bin, k_spot=m.k_spot, k_global=m.k_global)
    engine.eval()
    with torch.no_grad():
        pred = engine(batch.to(engine.device))
    engine.train()
    output = {k: v.float().cpu().numpy() for k, v in (("bin", pred.bin), ("spot", pred.spot), ("global", pred.glob))
              if v is not None}
    finite.check_model(step, state_dict, output, metrics)
    if not primary:
        return {}
    example = model_input(sample, cfg.model.bin_input, cfg.model.field > 0)
    artifacts = write_model_files(run_dir / "model", state_dict, cfg, shard_set, example, output)
    if not tracker.active:
        return {}
    tracker.log_figure(loss_curves(log.read("train"), log.read(cfg.data.eval_split)), "figures/loss_curves.png")
    uri, version = tracker.log_model(MagnetPyfunc(), artifacts, signature(example, output))
    tracker.set_tags({"model_uri": uri, "model_version": version or ""})
    return {"model_uri": uri, "model_version": version}


def example_sample(shard_set: ShardSet, cfg) -> dict:
    """The first readable sample of the evaluation (else training) shards, decoded, bins capped."""
    split = cfg.data.eval_split if shard_set.manifest.has_split(cfg.data.eval_split) else cfg.data.train_split
    sample = next(shard_set.reader(cfg.data.on_corrupt).read(u for u, _ in shard_set.shards(split)), None)
    if sample is None:
        raise UserError(f"{shard_set.manifest.path}: shards: no readable sample of split '{split}' for the model's "
                        f"example input (data.on_corrupt={cfg.data.on_corrupt} skipped them all)")
    return chunk_bins(sample, cfg.data.max_bins)[0]

"""Replicates as one command (``launch/experiment.py``): models x seeds trained as a Ray Tune grid through
the sweep machinery (:func:`magnet.sweep.run.run_sweep`), then every model scored once on the test slides by
``magnet evaluate`` (replicates, gene groups, paired statistics, context controls), logged into the
sweep's MLflow parent run.

What decides what: the models and seeds are fixed by the config and every trial trains to
``train.steps``; each model is its last step's weights (as every run's). No trial is picked: the Tune
grid runs without a scheduler and nothing is registered. The validation slides are scored during training
(``train.eval_every``, the trials' reported ``val/...``) for monitoring and for choosing the recipe before
this command is run; the test slides (``evaluate.split``) are scored once, at the end, by every model alike.

Layout of ``out_dir/name``: the sweep's (``runs/<trial>/model`` each trained model, ``summary.csv``...)
plus ``evaluation/`` (``magnet evaluate``'s files) and ``experiment.yaml`` (this config, resolved).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from magnet.commands import evaluate, main
from magnet.config import load_config, save_config
from magnet.errors import UserError
from magnet.evaluate.config import EvaluateConfig
from magnet.evaluate.truth import gene_groups_file, read_gene_groups
from magnet.format.manifest import Manifest, manifest_path
from magnet.io import check_not_input
from magnet.registry.tracking import refuse_credentials
from magnet.sweep.config import (AshaConfig, RayConfig, ResourcesConfig, SearchConfig, SweepConfig, SweepMlflowConfig,
                                 check_variants)
from magnet.sweep.run import STATE_FILE, absolute_paths, run_sweep
from magnet.sweep.space import VARIANT, base_config
from sharding.samplesheet import read_samplesheet


@dataclasses.dataclass(kw_only=True)
class EvaluationPlan:
    samplesheet: str = ""  # slides to score (CSV slide,spaceranger,image[,split]); required
    split: str = "test"  # the samplesheet's (else the shard manifest's) split that is scored, once
    gene_groups: str = ""  # CSV gene,group; "" = the slides' ground_truth/gene_groups.csv where present
    compare: list[str] = dataclasses.field(default_factory=list)  # A:B pairs (model names); [] = evaluate's default
    overrides: list[str] = dataclasses.field(default_factory=list)  # magnet evaluate key=value, e.g. top_k=50


@dataclasses.dataclass(kw_only=True)
class ExperimentMlflowConfig:
    tracking_uri: str = "sqlite:///mlruns.db"
    experiment: str = "magnet-hd-experiments"

    def __post_init__(self):  # recorded in experiment.yaml: no secrets in it
        refuse_credentials(self.tracking_uri, "mlflow.tracking_uri")


@dataclasses.dataclass(kw_only=True)
class ReplicatesConfig:
    name: str = "experiment"
    out_dir: str = "experiments"
    train_config: str = "configs/train/demo.yaml"  # the recipe every model is trained with
    train_overrides: list[str] = dataclasses.field(default_factory=list)
    shards: dict[str, str] = dataclasses.field(default_factory=dict)  # bin_um -> root holding {bin_um}um/
    models: list[str] = dataclasses.field(default_factory=lambda: ["magnet", "stnet"])  # labels: model.name values,
    # or labels of variants
    variants: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # label -> key=value overrides of its
    # trials, e.g. {magnet_nb: [model.name=magnet, loss.bin=nb]}: one model trained several ways
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])  # train.seed = model.seed per replicate
    max_concurrent: int = 0  # trials at a time; 0 = as many as the resources allow
    resources: ResourcesConfig = dataclasses.field(default_factory=ResourcesConfig)
    mlflow: ExperimentMlflowConfig = dataclasses.field(default_factory=ExperimentMlflowConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    evaluate: EvaluationPlan = dataclasses.field(default_factory=EvaluationPlan)

    def __post_init__(self):
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models: give distinct model names, got {self.models}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: give distinct seeds, got {self.seeds}")
        if self.max_concurrent < 0:
            raise ValueError("max_concurrent must be >= 0")
        check_variants(self.variants)
        unused = [label for label in self.variants if label not in self.models]
        if unused:
            raise ValueError(f"variants.{unused[0]}: not a label of models {self.models}")
        self.shards = {str(k): str(v) for k, v in self.shards.items()}


def sweep_config(cfg: ReplicatesConfig):
    """The Tune grid: ``variant`` (a label of ``models``: its ``variants`` overrides, else ``model.name=label``) x
    ``train.seed`` (``model.seed`` tied to it), no scheduler, nothing registered."""
    return SweepConfig(
        name=cfg.name, out_dir=cfg.out_dir, train_config=cfg.train_config, train_overrides=list(cfg.train_overrides),
        shards=dict(cfg.shards), space={VARIANT: {"grid": list(cfg.models)},
                                        "train": {"seed": {"grid": list(cfg.seeds)}}},
        tie={"model.seed": "train.seed"},
        variants={m: list(cfg.variants.get(m, [f"model.name={m}"])) for m in cfg.models},
        search=SearchConfig(algorithm="grid", num_samples=1, metric="val/loss", mode="min",
                            max_concurrent=cfg.max_concurrent),
        asha=AshaConfig(enabled=False), resources=cfg.resources,
        mlflow=SweepMlflowConfig(tracking_uri=cfg.mlflow.tracking_uri, experiment=cfg.mlflow.experiment,
                                 register_as="", alias=""),
        ray=cfg.ray)


def trained_models(summary: dict, sweep_dir: Path, cfg: ReplicatesConfig) -> dict[str, list[Path]]:
    """``{model name: [model folder per seed, in seed order]}``; a trial that did not finish is an error."""
    bad = [r for r in summary["trials"] if r["status"] != "finished"]
    if bad:
        raise UserError(f"{sweep_dir}: trials: {len(bad)} did not finish (e.g. {bad[0]['trial']}: {bad[0]['status']}"
                        f"{', ' + bad[0]['error'] if bad[0]['error'] else ''}); see summary.md")
    out: dict[str, dict[int, Path]] = {m: {} for m in cfg.models}
    for r in summary["trials"]:
        out[str(r[VARIANT])][int(r["train.seed"])] = sweep_dir / "runs" / r["trial"] / "model"
    return {m: distinct_weights([seeds[s] for s in sorted(seeds)]) for m, seeds in out.items()}


def distinct_weights(paths: list[Path]) -> list[Path]:
    """The models whose weights differ (by the sha256 each model folder records, which magnet evaluate checks at
    load), first seed first: a closed-form model (model.name=ridge) is the same for every seed, and one model given
    twice is not two replicates (magnet evaluate refuses it)."""
    seen: dict[str, Path] = {}
    for p in paths:
        seen.setdefault(json.loads((p / "model_meta.json").read_text())["weights_sha256"], p)
    return list(seen.values())


def evaluate_argv(cfg: ReplicatesConfig, models: dict[str, list[Path]], out: Path, parent_run_id: str,
                  overwrite: bool = False) -> list[str]:
    """``magnet evaluate`` of every model (its seeds as replicates) on the test split, into the parent run
    (``overwrite``: replacing the evaluation of an earlier run, on --resume)."""
    e = cfg.evaluate
    argv = ["evaluate"] + (["--overwrite"] if overwrite else [])
    for name, paths in models.items():
        argv += ["--model", f"{name}=" + ",".join(str(p) for p in paths)]
    argv += ["--samplesheet", e.samplesheet, "--split", e.split, "--out", str(out),
             "--tracking-uri", cfg.mlflow.tracking_uri]
    if e.gene_groups:
        argv += ["--gene-groups", e.gene_groups]
    for pair in e.compare:
        argv += ["--compare", pair]
    return argv + [f"experiment={cfg.mlflow.experiment}", f"run_id={parent_run_id}", f"run_name={cfg.name}",
                   *e.overrides]


def run_experiment(cfg: ReplicatesConfig, origin: str, resume: bool = False) -> dict:
    """Train the grid (or continue it), then evaluate; returns the sweep summary plus ``evaluation`` (folder)."""
    e = cfg.evaluate
    if not e.samplesheet:
        raise UserError(f"{origin}: evaluate.samplesheet: required (the slides the models are scored on)")
    if not Path(e.samplesheet).is_file():
        raise UserError(f"{origin}: evaluate.samplesheet: no file {e.samplesheet}")
    if e.gene_groups and not Path(e.gene_groups).is_file():
        raise UserError(f"{origin}: evaluate.gene_groups: no file {e.gene_groups}")
    try:  # the evaluation's keys are checked now, not after the whole grid has trained
        load_config(EvaluateConfig, None, e.overrides)
    except UserError as err:
        raise UserError(f"{origin}: evaluate.overrides: {err}") from None
    for pair in e.compare:
        names = pair.split(":")
        if len(names) != 2 or not all(n.split(" (")[0] in cfg.models + ["oracle", "local oracle"] for n in names):
            raise UserError(f"{origin}: evaluate.compare: '{pair}' is not A:B of models {', '.join(cfg.models)}")
    scfg = absolute_paths(sweep_config(cfg))
    sweep_dir = Path(scfg.out_dir) / scfg.name
    check_not_input(sweep_dir, "name", [("evaluate.samplesheet", e.samplesheet),
                                        ("evaluate.gene_groups", e.gene_groups)])
    check_evaluation(cfg, scfg)
    summary = summary_of(scfg, origin, resume)
    save_config(cfg, sweep_dir / "experiment.yaml")
    models = trained_models(summary, sweep_dir, cfg)
    out = sweep_dir / "evaluation"
    code = main(evaluate_argv(cfg, models, out, summary["parent_run_id"], overwrite=resume), [evaluate])
    if code != 0:
        raise UserError(f"{origin}: evaluate: magnet evaluate failed (exit status {code}, its error above); the "
                        f"trained models are kept: rerun with --resume")
    return {**summary, "evaluation": str(out), "models": {k: [str(p) for p in v] for k, v in models.items()}}


def check_evaluation(cfg: ReplicatesConfig, scfg) -> None:
    """Read and check what the evaluation will read, before any trial trains: the samplesheet (columns, names,
    every path), at least one slide of ``evaluate.split`` and none that the shards train on (the split of a
    slide without one is the manifest's, as magnet evaluate takes it from the models), and the gene groups
    (``evaluate.gene_groups``, else the first scored slide's ground truth where present)."""
    e = cfg.evaluate
    manifests = [Manifest.load(manifest_path(root, int(b))) for b, root in sorted(scfg.shards.items())]
    scored = []
    for entry in read_samplesheet(e.samplesheet):
        recorded = {m.splits[entry.slide] for m in manifests if entry.slide in m.splits}
        if (entry.split or next(iter(sorted(recorded)), "unseen")) != e.split:
            continue
        if "train" in recorded:
            raise UserError(f"{e.samplesheet}: slide: '{entry.slide}' is a training slide of the shards (manifest "
                            f"splits); evaluate on held-out slides")
        scored.append(entry)
    if not scored:
        raise UserError(f"{e.samplesheet}: split: no slide of split '{e.split}' to evaluate (evaluate.split)")
    groups = e.gene_groups or next((str(gene_groups_file(x.spaceranger)) for x in scored
                                    if gene_groups_file(x.spaceranger).is_file()), None)
    if groups:
        genes = base_config(scfg).data.genes
        for m in manifests:
            read_gene_groups(Path(groups), list(genes or m.genes))


def summary_of(scfg, origin: str, resume: bool) -> dict:
    """The sweep's summary with its trials: run it (``resume``: continue it, or read the finished one back)."""
    summary = run_sweep(scfg, origin, resume=resume)
    if "trials" in summary:
        return summary
    sweep_dir = Path(scfg.out_dir) / scfg.name  # finished earlier: the trials from its summary.csv
    with open(sweep_dir / "summary.csv", newline="") as f:
        trials = [{**r, "error": r.get("error", "")} for r in csv.DictReader(f)]
    state = json.loads((sweep_dir / STATE_FILE).read_text())
    return {**summary, "trials": trials, "parent_run_id": state["parent_run_id"]}

"""`launch/experiment.py` (configs/experiment/tiny.yaml): 2 models x 2 seeds as Ray Tune grid trials on the tiny
shards (one of them a variant: a model trained another way), then `magnet evaluate` on the test slide into the
sweep's MLflow parent run; and its config errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, train_env


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def cohort4(tmp_path_factory):
    """4 tiny slides sharded at 16 um: 2 train, 1 val, 1 test (the tiny cohort has no test slide)."""
    from magnet.cli import main

    root = tmp_path_factory.mktemp("cohort4")
    assert main(["synth", "--config", str(REPO / "configs/synth/tiny.yaml"), "--out", str(root / "slides"),
                 "--slides", "4"]) == 0
    assert main(["shard", "--samplesheet", str(root / "slides/samplesheet.csv"), "--bin-um", "16",
                 "--out", str(root / "shards"), "--config", str(REPO / "configs/shard/tiny.yaml"),
                 "split.val_frac=0.25", "split.test_frac=0.25"]) == 0
    splits = json.loads((root / "shards/16um/manifest.json").read_text())["splits"]
    assert sorted(splits.values()) == ["test", "train", "train", "val"]
    return root, splits


def _run(argv, timeout=900):
    return subprocess.run([sys.executable, "launch/experiment.py", *argv], env=train_env(RAY_AUTH_MODE="disabled"),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_models_by_seeds_trained_then_scored_once_on_the_test_slide(cohort4, tmp_path):
    import mlflow

    root, splits = cohort4
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    proc = _run(["--config", "configs/experiment/tiny.yaml", f"shards.16={root / 'shards'}", f"out_dir={tmp_path}/exp",
                 f"mlflow.tracking_uri={uri}", f"evaluate.samplesheet={root / 'slides/samplesheet.csv'}",
                 "models=[magnet,stnet_mse]", "variants.stnet_mse=[model.name=stnet,loss.bin_pcc=0]",
                 "evaluate.compare=[magnet:stnet_mse]"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["models"]) == {"magnet", "stnet_mse"} and all(len(v) == 2 for v in result["models"].values())
    exp = tmp_path / "exp" / "tiny"
    trials = _rows(exp / "summary.csv")
    assert sorted((t["variant"], t["train.seed"]) for t in trials) == [
        ("magnet", "0"), ("magnet", "1"), ("stnet_mse", "0"), ("stnet_mse", "1")]
    assert {t["status"] for t in trials} == {"finished"}
    for t in trials:  # model.seed tied to train.seed; the variant's overrides in its trials only
        cfg = yaml.safe_load((exp / "runs" / t["trial"] / "model" / "config.yaml").read_text())["config"]
        assert cfg["model"]["seed"] == cfg["train"]["seed"] == int(t["train.seed"])
        assert (cfg["model"]["name"], cfg["loss"]["bin_pcc"]) == (
            ("stnet", 0) if t["variant"] == "stnet_mse" else ("magnet", 0.1))
    ev = exp / "evaluation"
    test = [s for s, v in splits.items() if v == "test"]
    assert {(r["slide"], r["split"]) for r in _rows(ev / "evaluation_slides.csv")} == {(test[0], "test")}
    reps = {(r["model"], r["level"], r["source"]): r for r in _rows(ev / "evaluation_replicates.csv")}
    for name in ("magnet", "stnet_mse", "magnet (context zeroed)", "magnet (context shuffled)"):
        assert int(reps[(name, "bins", "bin head")]["n_replicates"]) == 2
    paired = [r for r in _rows(ev / "evaluation_paired.csv") if (r["a"], r["b"]) == ("magnet", "stnet_mse")]
    assert paired and paired[0]["bootstrap_over"] == "genes"
    assert (ev / "scatter_magnet_vs_stnet_mse_16um.png").is_file()
    pairs = {(r["a"], r["b"]) for r in _rows(ev / "evaluation_paired.csv")}
    assert pairs == {("magnet", "stnet_mse"), ("magnet", "magnet (context zeroed)"),
                     ("magnet", "magnet (context shuffled)")}

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(result["parent_run_id"])
    assert parent.data.tags.get("sweep.role") == "parent"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.md", "evaluation/evaluation_paired.csv",
            "evaluation/scatter_magnet_vs_stnet_mse_16um.png"} <= artifacts
    delta = next(r for r in paired if r["group"] == "all")["delta"]
    assert parent.data.metrics["paired/magnet_vs_stnet_mse/16um/all/delta"] == pytest.approx(float(delta))
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4


def test_missing_samplesheet_is_refused_before_training(tmp_path):
    proc = _run(["--config", "configs/experiment/tiny.yaml", f"shards.16={tmp_path}", f"out_dir={tmp_path}/exp",
                 f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"], timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert err == ["magnet: error: configs/experiment/tiny.yaml: evaluate.samplesheet: required (the slides the "
                   "models are scored on)"]
    assert not (tmp_path / "exp").exists()


def test_tie_names_a_swept_key():
    """``tie`` copies a swept value into another key of each trial; a tie to a key outside the space is refused."""
    from magnet.errors import UserError
    from magnet.sweep.config import SweepConfig
    from magnet.sweep.space import param_space, trial_config

    space = {"train": {"seed": {"grid": [3, 4]}}}
    cfg = SweepConfig(train_config=str(REPO / "configs/train/tiny.yaml"), shards={"16": "s"}, space=space,
                      tie={"model.seed": "train.seed"})
    assert set(param_space(cfg)) == {"train.seed"}
    trial = trial_config(cfg, {"train.seed": 4}, REPO / "runs", "t", "parent")
    assert trial.train.seed == trial.model.seed == 4
    with pytest.raises(UserError, match="tie.model.seed: 'optim.lr' is not a key of the search space"):
        param_space(SweepConfig(space=space, tie={"model.seed": "optim.lr"}))


def test_variants_set_several_keys_per_grid_value():
    """An experiment's label is a model name or a variant (its overrides): the Tune grid runs over labels and each
    trial gets its label's keys; a label the config does not know, and a variant that moves the shards, are refused."""
    from magnet.config import load_config
    from magnet.errors import UserError
    from magnet.sweep.replicates import ReplicatesConfig, sweep_config
    from magnet.sweep.space import param_space, trial_config

    cfg = ReplicatesConfig(train_config=str(REPO / "configs/train/tiny.yaml"), shards={"16": "s"}, seeds=[5],
                           models=["stnet", "magnet_nb"], variants={"magnet_nb": ["model.name=magnet", "loss.bin=nb"]})
    scfg = sweep_config(cfg)
    assert set(param_space(scfg)) == {"variant", "train.seed"}
    nb = trial_config(scfg, {"variant": "magnet_nb", "train.seed": 5}, REPO / "runs", "t", "parent")
    plain = trial_config(scfg, {"variant": "stnet", "train.seed": 5}, REPO / "runs", "t", "parent")
    assert (nb.model.name, nb.loss.bin, nb.model.seed) == ("magnet", "nb", 5)
    assert (plain.model.name, plain.loss.bin) == ("stnet", "mse_pcc")
    with pytest.raises(UserError, match="'nope' is not a valid value"):  # not a model name, not a variant
        param_space(sweep_config(ReplicatesConfig(train_config=cfg.train_config, shards={"16": "s"},
                                                  models=["nope"])))
    with pytest.raises(UserError, match="variants.magnet_x: not a label of models"):
        load_config(ReplicatesConfig, None, ["models=[magnet]", "variants.magnet_x=[loss.bin=nb]"])
    with pytest.raises(UserError, match="variants.m8: data.bin_um and data.shards are set by the space"):
        load_config(ReplicatesConfig, None, ["models=[m8]", "variants.m8=[model.name=magnet,data.bin_um=8]"])


def test_a_resumed_experiment_replaces_its_evaluation():
    """magnet evaluate refuses an existing --out: --resume (re-evaluating an experiment) passes --overwrite, a new
    experiment does not (its folder is new; the sweep refuses a name in use)."""
    from magnet.sweep.replicates import ReplicatesConfig, evaluate_argv

    cfg = ReplicatesConfig(models=["magnet"], seeds=[0])
    models = {"magnet": [Path("runs/t0/model")]}
    assert "--overwrite" not in evaluate_argv(cfg, models, Path("eval"), "parent")
    assert evaluate_argv(cfg, models, Path("eval"), "parent", overwrite=True)[:2] == ["evaluate", "--overwrite"]


@pytest.mark.parametrize("path", sorted((REPO / "configs/experiment").glob("*.yaml")), ids=lambda p: p.name)
def test_every_experiment_config_loads_and_its_grid_is_valid(path):
    """Each shipped experiment config reads, and every label x seed it trains is a valid training config."""
    from magnet.config import load_config
    from magnet.sweep.replicates import ReplicatesConfig, sweep_config
    from magnet.sweep.space import param_space

    cfg = load_config(ReplicatesConfig, str(path), [])
    cfg.train_config = str(REPO / cfg.train_config)
    assert set(param_space(sweep_config(cfg))) == {"variant", "train.seed"}


def test_seeds_that_give_the_same_weights_are_one_replicate(tmp_path):
    """A closed-form model (ridge) trains the same weights for every seed: the experiment scores it once, where
    magnet evaluate would refuse one model given twice."""
    from magnet.sweep.replicates import distinct_weights

    paths = []
    for seed, weights in enumerate([b"ridge", b"ridge", b"other"]):
        (tmp_path / str(seed)).mkdir()
        (tmp_path / str(seed) / "model_meta.json").write_text(json.dumps({"weights_sha256": weights.decode()}))
        paths.append(tmp_path / str(seed))
    assert distinct_weights(paths) == [paths[0], paths[2]]

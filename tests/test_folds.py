"""Cross-validation folds on `tiny_shards` (3 slides, 2 folds): one tiny model per fold trained with
`data.fold` (one plain DeepSpeed process each, as conftest `registered`), what its pipeline reads, that the
held-out fold chooses no checkpoint, `magnet evaluate` over both fold models (mean ± sd over folds against
an independent computation from the per-slide CSV), and the refusals."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import train_env
from model_copies import noisy_copy

from magnet.cli import main
from magnet.config import config_from_saved
from magnet.data.pipeline import EvalStream, Pipeline, ShardSet, TrainStream
from magnet.dist import WorldInfo
from magnet.train_config import ExperimentConfig
from magnet.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
KNN = {"k_bin": 4, "k_spot": 4, "k_global": 4}


def _manifest(tiny_shards) -> dict:
    return json.loads((tiny_shards / "16um" / "manifest.json").read_text())


def _train(tiny_shards, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.out_dir={out}", "train.steps=2", "train.eval_every=1",
           "train.ckpt_every=0", "train.deepspeed=zero1", "data.workers=0", *extra]
    return subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def fold_runs(tiny_shards, tmp_path_factory) -> tuple[dict[int, Path], str]:
    """{fold: run folder} of a 2-step model per fold (evaluated every step); fold 1 logs to MLflow."""
    out = tmp_path_factory.mktemp("folds")
    uri = f"sqlite:///{out}/mlruns.db"
    runs = {}
    for k in sorted(set(_manifest(tiny_shards)["folds"].values())):
        logging = ["mlflow.enabled=true", f"mlflow.tracking_uri={uri}"] if k == 1 else []
        proc = _train(tiny_shards, out, f"train.run_name=f{k}", f"data.fold={k}", *logging)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs[k] = out / f"f{k}"
    return runs, uri


def _slides_read(stages: list, n_samples: int) -> list[str]:
    """Slides of the samples the stream's ``samples`` stage yields (meta.json as read from the tars)."""
    upto = [name for name, _ in stages].index("samples") + 1
    raw = itertools.islice(iter(Pipeline(stages[:upto])), n_samples)
    return [json.loads(s["meta.json"])["slide"] for s in raw]


def test_a_fold_trains_on_the_other_folds_and_evaluates_on_its_own(fold_runs, tiny_shards):
    runs, _ = fold_runs
    folds = _manifest(tiny_shards)["folds"]
    assert len(set(folds.values())) == 2
    one = WorldInfo(0, 1, 0)
    for k, run in runs.items():
        cfg = config_from_saved(ExperimentConfig, run / "config.yaml")  # as the run recorded it
        assert cfg.data.fold == k and cfg.data.folds == folds
        shard_set = ShardSet.for_training(cfg.data)  # what the training loop builds from it
        for entry in shard_set.manifest.shards:  # each shard names the one slide it holds
            raw = shard_set.reader("fail").raw(iter([{"url": str(shard_set.manifest.root / entry.name)}]))
            assert {json.loads(r["meta.json"])["slide"] for r in raw} == {entry.slide}
        train = TrainStream(shard_set, cfg.data, one, 0, KNN)
        n_train = sum(n for _, n in shard_set.shards(cfg.data.train_split))
        read = _slides_read(train.stages(0), n_train)  # one round of the resampled shard list
        assert len(read) == n_train and set(read) == {s for s, f in folds.items() if f != k}
        evaluated = _slides_read(EvalStream(shard_set, cfg.data, one, cfg.data.eval_split, KNN).stages(), 10**6)
        assert set(evaluated) == {s for s, f in folds.items() if f == k}


def test_the_held_out_fold_picks_no_checkpoint(fold_runs, tiny_shards, tmp_path):
    """Its metrics are logged at every evaluation, but no `best` checkpoint exists and the model is the
    last step's weights (the final checkpoint's module)."""
    import mlflow
    import torch
    from safetensors.torch import load_file

    runs, uri = fold_runs
    folds = _manifest(tiny_shards)["folds"]
    for k, run in runs.items():
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows if r["kind"] == "val"] == [1, 2]
        ckpt = run / "checkpoints"
        assert not (ckpt / "best").exists() and not list(ckpt.glob("best-*"))
        assert (ckpt / "latest").read_text() == "step00000002"
        (states,) = (ckpt / "step00000002").glob("mp_rank_00_model_states.pt")
        last = torch.load(states, map_location="cpu", weights_only=False)["module"]
        model = load_file(str(run / "model" / "model.safetensors"))
        assert set(model) == set(last)
        assert all(torch.equal(model[n], last[n].float()) for n in model)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (logged,) = client.search_runs([client.get_experiment_by_name("magnet-tiny").experiment_id])
    assert logged.data.params["data.fold"] == "1"
    assert {k: int(logged.data.params[f"data.folds.{k}"]) for k in folds} == folds
    table = json.loads(Path(client.download_artifacts(logged.info.run_id, "eval/step00000002.json",
                                                      str(tmp_path))).read_text())
    slide = table["columns"].index("slide")
    assert {r[slide] for r in table["data"]} == {s for s, f in folds.items() if f == 1}  # the run's own evaluation


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_scores_each_slide_with_its_fold_model(fold_runs, tiny_cohort, tiny_shards, tmp_path):
    runs, _ = fold_runs
    folds = _manifest(tiny_shards)["folds"]
    uri = f"sqlite:///{tmp_path}/eval.db"
    argv = ["evaluate", *(a for k in sorted(runs) for a in ("--model", str(runs[k] / "model"))),
            "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--tracking-uri", uri, "--out", str(tmp_path / "cv"),
            "top_k=5", "oracle=false", "controls=[]", "predict.max_bins=100000", "run_name=cv"]
    assert main(argv) == 0
    per_slide = _rows(tmp_path / "cv" / "evaluation_slides.csv")
    summary = _rows(tmp_path / "cv" / "evaluation.csv")
    assert {r["model"] for r in summary} == {"magnet"}  # both fold models in one row per level
    row = next(r for r in summary if r["level"] == "bins")
    mine = [r for r in per_slide if r["level"] == "bins"]
    assert {r["slide"]: int(r["fold"]) for r in mine} == folds and len(mine) == len(folds)
    assert all(r["split"] == f"fold{r['fold']}" for r in mine)  # scored by the model that held it out
    assert int(row["n_folds"]) == 2 and int(row["n_slides"]) == 3
    for m in METRICS:
        values = {r["slide"]: float(r[m]) for r in mine}
        per_fold = [np.mean([v for s, v in values.items() if folds[s] == k]) for k in sorted(set(folds.values()))]
        assert float(row[f"{m}_fold_mean"]) == pytest.approx(np.mean(per_fold), rel=1e-6)
        assert float(row[f"{m}_fold_sd"]) == pytest.approx(np.std(per_fold, ddof=1), rel=1e-6)
        assert float(row[m]) == pytest.approx(np.mean(list(values.values())), rel=1e-6)
    md = (tmp_path / "cv" / "evaluation.md").read_text()
    assert "## Over folds" in md and "mean ± sd over folds" in md
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("magnet-evaluate").experiment_id])
    bins = next(r for r in summary if r["level"] == "bins")
    assert run.data.metrics["magnet/16um/pcc_gene_fold_mean"] == pytest.approx(float(bins["pcc_gene_fold_mean"]))
    assert run.data.metrics["magnet/16um/mse_fold_sd"] == pytest.approx(float(bins["mse_fold_sd"]))


def test_a_fold_model_refuses_the_slides_it_trained_on(fold_runs, tiny_cohort, tiny_shards, tmp_path, capsys):
    runs, _ = fold_runs
    trained = next(s for s, f in _manifest(tiny_shards)["folds"].items() if f != 0)
    sheet = tmp_path / "sheet.csv"
    sheet.write_text(f"slide,spaceranger,image\n{trained},{tiny_cohort / trained / 'outs'},"
                     f"{tiny_cohort / trained / f'{trained}_fullres.tif'}\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(runs[0] / "model"), "--samplesheet", str(sheet), "--out", str(out),
                 "mlflow=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"'{trained}' is a training slide of model 'magnet'" in err[0], err
    assert not out.exists()


def test_fold_out_of_range_is_one_line(tiny_shards, tmp_path):
    proc = _train(tiny_shards, tmp_path, "train.run_name=bad", "data.fold=7")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith("magnet: error: ") and "16um/manifest.json: data.fold: 7" in err[0]
    assert not (tmp_path / "bad").exists()


def test_a_fold_given_twice_is_refused(fold_runs, tiny_cohort, tmp_path, capsys):
    """Models of folds 0, 1, 1 under one label (two models of fold 1): the repeated fold is named, not one of its
    models dropped."""
    runs, _ = fold_runs
    other = noisy_copy(runs[1] / "model", tmp_path / "fold1_other")
    models = [str(runs[0] / "model"), str(runs[1] / "model"), str(other)]
    out = tmp_path / "eval"
    assert main(["evaluate", *(a for m in models for a in ("--model", m)), "--samplesheet",
                 str(tiny_cohort / "samplesheet.csv"), "--out", str(out), "mlflow=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'magnet' is given twice for fold 1" in err[0], err
    assert err[0].startswith(f"magnet: error: {other.resolve()}: --model: ")
    assert not out.exists()


def test_resuming_a_fold_run_without_its_fold_is_refused(fold_runs, tiny_shards):
    """Without data.fold the resumed run would train on the manifest's splits, held-out fold included."""
    runs, _ = fold_runs
    saved = (runs[0] / "config.yaml").read_text()
    proc = _train(tiny_shards, runs[0].parent, "train.run_name=f0", "train.steps=3", "--resume", "latest")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert err == [f"magnet: error: {runs[0] / 'config.yaml'}: data.fold: the run was trained with 0; resuming with "
                   "None would not match its weights (resume without that override, or start another run)"], err
    assert (runs[0] / "config.yaml").read_text() == saved
    assert (runs[0] / "checkpoints" / "latest").read_text() == "step00000002"

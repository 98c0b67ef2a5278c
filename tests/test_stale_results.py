"""Nothing stale is reused silently and nothing is found wrong after the work: a cohort re-predicted into the
same --out by another model (or with other settings) is refused in one line, its files kept; an experiment
reads and checks its evaluation's samplesheet and gene groups before any training; an experiment resumed with
other seeds is refused instead of re-evaluating the old models under the new config's name."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, train_env
from model_copies import noisy_copy

S = "synth_000"


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _predict(uri: str, model: str, sheet: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    cmd = [sys.executable, "-m", "magnet", "predict", "--model", model, "--tracking-uri", uri, "--samplesheet",
           str(sheet), "--out", str(out), "cohort.num_cpus=1", "cohort.object_store_mb=100", "progress=false", *extra]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_cohort_refuses_to_keep_files_of_another_model_or_setting(registered, tiny_cohort, tmp_path):
    uri, run_dir = registered
    sheet = tmp_path / "one.csv"
    sheet.write_text(f"slide,spaceranger,image\n{S},{tiny_cohort / S / 'outs'},"
                     f"{tiny_cohort / S / f'{S}_fullres.tif'}\n")
    out = tmp_path / "preds"
    first = _predict(uri, "models:/tiny@champion", sheet, out)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = _sha(out / f"{S}.h5ad")

    other = noisy_copy(run_dir / "model", tmp_path / "other")
    for model, extra, field in ((str(other), (), "model"), ("models:/tiny@champion", ("context=zero",), "context")):
        proc = _predict(uri, model, sheet, out, *extra)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and err[-1].startswith("magnet: error: "), proc.stderr[-3000:]
        assert f"{S}.config.yaml: {field}: {S}.h5ad was predicted" in err[-1] and "--overwrite" in err[-1]
        assert _sha(out / f"{S}.h5ad") == kept
        if field == "model":
            assert "predicted by models:/tiny/1 (weights sha256 " in err[-1] and f"model is {other} (" in err[-1]
    same = _predict(uri, "models:/tiny@champion", sheet, out)  # the same model and settings: kept, skipped
    assert same.returncode == 0 and "1 of 1 slides already done" in same.stderr, same.stderr[-3000:]
    again = _predict(uri, str(other), sheet, out, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _sha(out / f"{S}.h5ad") != kept
    assert yaml.safe_load((out / f"{S}.config.yaml").read_text())["model"]["uri"] == str(other)


def _experiment(*argv: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch/experiment.py", "--config", "configs/experiment/tiny.yaml", *argv],
                          env=train_env(RAY_AUTH_MODE="disabled"), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _sheet(path: Path, cohort: Path, rows: list[tuple[str, str]], image: str | None = None) -> Path:
    path.write_text("slide,spaceranger,image,split\n" + "".join(
        f"{s},{cohort / s / 'outs'},{image or cohort / s / f'{s}_fullres.tif'},{split}\n" for s, split in rows))
    return path


@pytest.mark.parametrize("case", ["missing_image", "no_test_slide", "training_slide", "gene_groups"])
def test_experiment_checks_its_evaluation_inputs_before_training(case, tiny_cohort, tiny_shards, tmp_path):
    import json

    splits = json.loads((tiny_shards / "16um" / "manifest.json").read_text())["splits"]
    held = next(s for s, v in splits.items() if v != "train")
    trained = next(s for s, v in splits.items() if v == "train")
    sheet, extra, expect = tmp_path / "eval.csv", [], ""
    if case == "missing_image":
        _sheet(sheet, tiny_cohort, [(held, "test")], image=str(tmp_path / "nowhere.tif"))
        expect = f"(slide {held}): image: file not found"
    elif case == "no_test_slide":
        _sheet(sheet, tiny_cohort, [(held, "val")])
        expect = f"{sheet}: split: no slide of split 'test' to evaluate"
    elif case == "training_slide":
        _sheet(sheet, tiny_cohort, [(trained, "test")])
        expect = f"{sheet}: slide: '{trained}' is a training slide of the shards"
    else:
        _sheet(sheet, tiny_cohort, [(held, "test")])
        groups = tmp_path / "groups.csv"
        groups.write_text("gene,kind\nG1,a\n")
        extra, expect = [f"evaluate.gene_groups={groups}"], f"{groups}: group: column missing"
    proc = _experiment(f"shards.16={tiny_shards}", f"out_dir={tmp_path}/exp", f"mlflow.tracking_uri=sqlite:///"
                       f"{tmp_path}/m.db", f"evaluate.samplesheet={sheet}", *extra, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and expect in err[0], proc.stderr[-3000:]
    assert not (tmp_path / "exp").exists() and not (tmp_path / "m.db").exists()


@pytest.mark.slow
def test_experiment_resumed_with_other_seeds_is_refused(tiny_cohort, tiny_shards, tmp_path):
    import json

    splits = json.loads((tiny_shards / "16um" / "manifest.json").read_text())["splits"]
    held = next(s for s, v in splits.items() if v != "train")
    sheet = _sheet(tmp_path / "eval.csv", tiny_cohort, [(held, "test")])
    argv = [f"shards.16={tiny_shards}", f"out_dir={tmp_path}/exp", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"evaluate.samplesheet={sheet}", "models=[magnet]", "evaluate.compare=[]"]
    first = _experiment(*argv, "seeds=[0]")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    record = tmp_path / "exp" / "tiny" / "experiment.yaml"
    before = record.read_text()
    for change, key in (("seeds=[1]", "space.train.seed.grid: [1] now, [0] when the sweep started"),
                        ("train_overrides=[train.steps=3]", "train_overrides")):
        proc = _experiment(*argv, "seeds=[0]", change, "--resume", timeout=120)
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1 and key in err[0] and "--resume" in err[0], proc.stderr[-3000:]
        assert record.read_text() == before

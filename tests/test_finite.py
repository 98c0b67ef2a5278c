"""Finite or nothing: a training whose loss goes non-finite (a learning rate far too large, NaN frozen features
in the shards) stops in one line naming the step, with nothing registered and its MLflow run FAILED; a model
folder whose weights file was damaged is refused at load (its sha256 is recorded beside it); a model whose
weights give non-finite values is refused by `magnet predict`; the registry pyfunc refuses non-finite inputs
and bin positions outside the tile's image. Trainings are `launch/train.py` subprocesses (one plain DeepSpeed
process), the registry is the sqlite store of conftest's `registered`."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import train_env

from magnet.cli import main
from magnet.errors import UserError
from magnet.format.tar import sha256_file

REPO = Path(__file__).resolve().parents[1]


def _store(out: Path) -> tuple[int, list[str]]:
    """(registered model versions, run statuses) of the sqlite MLflow store in ``out``."""
    with sqlite3.connect(out / "mlruns.db") as db:
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
        return versions, [row[0] for row in db.execute("select status from runs")]


@pytest.mark.slow
@pytest.mark.parametrize("cause", ["lr", "nan_features"])
def test_training_that_goes_non_finite_stops_and_registers_nothing(cause, tiny_shards, tmp_path):
    """Both trained to the end with a NaN loss, exit 0, and registered the model as champion."""
    from shard_damage import nan_features, rehash

    shards, extra = tiny_shards, ["optim.lr=1e30", "train.nonfinite_skips=1"]  # the policy: one skip, then stop
    if cause == "nan_features":
        shards, extra = tmp_path / "shards", []
        shutil.copytree(tiny_shards / "16um", shards / "16um")
        for tar in sorted((shards / "16um").glob("train-*.tar")):
            assert nan_features(tar) > 0
            rehash(shards / "16um", tar.name)
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.run_name=nf", "train.steps=4",
           "train.deepspeed=zero1",
           "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db", "mlflow.register_as=tiny",
           "mlflow.alias=champion", *extra]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "finite" in errors[0], errors
    if cause == "lr":  # step 1 is finite; the second micro-batch is skipped, the third stops it
        assert re.search(r"train\.nonfinite_skips: step 2: the training loss is not finite \(1 skipped before, "
                         r"at most 1 allowed\)", errors[0]), errors
    versions, statuses = _store(tmp_path)
    assert versions == 0 and "FINISHED" not in statuses, (versions, statuses)
    assert not (tmp_path / "nf" / "model").exists()


def _copy_model(registered, tmp_path: Path) -> Path:
    _, run_dir = registered
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    return model


def _predict_fails(model: Path, tiny_cohort: Path, tmp_path: Path, capsys, expect: str) -> None:
    out = tmp_path / "p.h5ad"
    slide = tiny_cohort / "synth_000"
    rc = main(["predict", "--model", str(model), "--spaceranger", str(slide / "outs"),
               "--image", str(slide / "synth_000_fullres.tif"), "--out", str(out), "progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("magnet: error: ") and expect in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".p.h5ad*"))


def test_damaged_weights_file_is_refused(registered, tiny_cohort, tmp_path, capsys):
    """A flipped byte inside a tensor loaded fine and predicted 100% NaN with exit 0."""
    model = _copy_model(registered, tmp_path)
    raw = bytearray((model / "model.safetensors").read_bytes())
    raw[len(raw) - 7] ^= 0xFF  # inside the last tensor's data: the file still parses
    (model / "model.safetensors").write_bytes(bytes(raw))
    _predict_fails(model, tiny_cohort, tmp_path, capsys,
                   f"{model / 'model.safetensors'}: weights: sha256 does not match model_meta.json's weights_sha256")


def test_registered_damaged_weights_are_refused_by_the_pyfunc(registered, tmp_path):
    import mlflow

    uri, _ = registered
    store = Path(uri[len("sqlite:///"):]).parent
    mlmodel = next(p.parent for p in (store / "mlartifacts").rglob("MLmodel"))
    copy = tmp_path / "mlmodel"
    shutil.copytree(mlmodel, copy)
    weights = next(copy.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-7] + b"\x00" * 7)
    with pytest.raises(UserError, match="weights: sha256 does not match") as err:
        mlflow.pyfunc.load_model(str(copy))
    assert "\n" not in str(err.value)


def test_weights_that_give_nan_are_refused_by_predict(registered, tiny_cohort, tmp_path, capsys):
    """Weights that are NaN with a matching checksum (e.g. a model written by a diverged training before this
    check): `magnet predict` refuses the non-finite output in one line instead of writing NaN."""
    import torch
    from safetensors.torch import load_file, save_file

    model = _copy_model(registered, tmp_path)
    state = load_file(model / "model.safetensors")
    state = {k: torch.full_like(v, float("nan")) if k.startswith("heads.") and v.is_floating_point() else v
             for k, v in state.items()}  # the output heads diverged; the frozen encoder is intact
    save_file(state, model / "model.safetensors")
    meta = json.loads((model / "model_meta.json").read_text())
    meta["weights_sha256"] = sha256_file(model / "model.safetensors")
    (model / "model_meta.json").write_text(json.dumps(meta))
    _predict_fails(model, tiny_cohort, tmp_path, capsys, "model: output: ")


@pytest.fixture(scope="module")
def pyfunc(registered):
    import mlflow

    uri, run_dir = registered
    mlflow.set_tracking_uri(uri)
    with np.load(run_dir / "model" / "example_input.npz") as ex:
        example = dict(ex)
    return mlflow.pyfunc.load_model("models:/tiny@champion"), example


@pytest.mark.parametrize("damage, expect", [
    ("nan_feature", "input.spot_feat.npy.zst: non-finite values"),
    ("nan_position", "input.bin_xy.npy.zst: non-finite values"),
    ("far_position", "input.bin_xy: 1 of"),
    ("negative_position", "input.bin_xy: 1 of"),
])
def test_pyfunc_refuses_bad_inputs(pyfunc, damage, expect):
    model, example = pyfunc
    assert all(np.isfinite(v).all() for v in model.predict(example).values())
    x = {k: v.copy() for k, v in example.items()}
    if damage == "nan_feature":
        x["spot_feat"][0, 0, 0] = np.nan
    elif damage == "nan_position":
        x["bin_xy"][0, 1] = np.nan
    else:
        x["bin_xy"][-1, 0] = 1e6 if damage == "far_position" else -1.0
    with pytest.raises(UserError, match=re.escape(expect)) as err:
        model.predict(x)
    assert "\n" not in str(err.value)

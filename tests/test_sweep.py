"""Ray Tune sweeps (launch/sweep.py) on `tiny_shards`: 4 trials over 8 and 16 um with ASHA, one MLflow
parent with a child per trial, the best model registered as `@sweep-best` and loaded in a fresh
process; a trial with a bad value fails alone; a resolution without shards is refused up front.

Each sweep is a subprocess with its own local Ray (`ray.num_cpus=2`, `ray.object_store_mb=100`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/sweep/tiny.yaml")


@pytest.fixture(scope="module")
def sweep_env() -> dict:
    ext = REPO / "build" / "torch_extensions"  # shared with tests/test_train_deepspeed.py: the shm op compiles once
    ext.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="disabled", TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               CI="true", RAY_DEDUP_LOGS="0")
    return env


def _sweep(env: dict, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "launch/sweep.py", "--config", TINY, f"out_dir={out}",
           f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", *args]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _summary(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(sweep_dir: Path) -> list[dict]:
    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


def _children(client, parent_id: str) -> list:
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.fixture(scope="module")
def main_sweep(tiny_shards, tmp_path_factory, sweep_env):
    out = tmp_path_factory.mktemp("sweep")
    proc = _sweep(sweep_env, out, f"shards.8={tiny_shards}", f"shards.16={tiny_shards}")
    return out, _summary(proc)


@pytest.mark.slow
def test_sweep_over_resolutions_stops_early_and_tracks_children(main_sweep):
    from mlflow import MlflowClient

    out, summary = main_sweep
    rows = _rows(out / "tiny")
    assert len(rows) == 4
    assert sorted((r["data.bin_um"], r["optim.lr"]) for r in rows) == \
        sorted((b, lr) for b in ("8", "16") for lr in ("0.003", "1e-05"))
    statuses = [r["status"] for r in rows]
    assert "stopped_early" in statuses and "finished" in statuses and "failed" not in statuses
    for r in rows:  # ASHA (grace period 2, last step 4): stopped trials end at the rung, the others at the end
        assert int(r["step"]) == (4 if r["status"] == "finished" else 2)

    client = MlflowClient(tracking_uri=f"sqlite:///{out}/mlflow.db")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "tiny"
    children = _children(client, parent.info.run_id)
    assert sorted(c.info.run_name for c in children) == sorted(r["trial"] for r in rows)
    by_trial = {r["trial"]: r for r in rows}
    for c in children:
        row = by_trial[c.info.run_name]
        assert c.info.status == {"finished": "FINISHED", "stopped_early": "KILLED"}[row["status"]]
        assert c.data.tags["sweep.status"] == row["status"]
        assert c.data.params["data.bin_um"] == row["data.bin_um"]
        assert float(c.data.params["optim.lr"]) == float(row["optim.lr"])
        assert c.data.metrics["val/loss"] == pytest.approx(float(row["val/loss"]))
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md", "metric_vs_params.png"} <= artifacts
    assert (out / "tiny" / "metric_vs_params.png").stat().st_size > 1000


@pytest.mark.slow
def test_best_trial_is_registered_and_loads_in_a_fresh_process(main_sweep, sweep_env):
    from mlflow import MlflowClient

    out, summary = main_sweep
    uri = f"sqlite:///{out}/mlflow.db"
    finished = [r for r in _rows(out / "tiny") if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r["val/loss"]))  # tiny.yaml: search.metric val/loss, mode min
    version = MlflowClient(tracking_uri=uri).get_model_version_by_alias("tiny-sweep", "sweep-best")
    assert version.run_id == summary["best"]["run_id"]
    assert summary["best"]["trial"] == best["trial"]
    model_dir = out / "tiny" / "runs" / best["trial"] / "model"
    code = (
        "import sys, numpy as np, mlflow\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "m = mlflow.pyfunc.load_model('models:/tiny-sweep@sweep-best')\n"
        "np.savez(sys.argv[3], **m.predict(dict(np.load(sys.argv[2]))))\n"
    )
    pred_path = out / "pred.npz"
    proc = subprocess.run([sys.executable, "-c", code, uri, str(model_dir / "example_input.npz"), str(pred_path)],
                          env=sweep_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, pred = np.load(model_dir / "example_output.npz"), np.load(pred_path)
    assert set(pred.files) == set(ref.files) >= {"bin"}
    for k in ref.files:
        np.testing.assert_allclose(pred[k], ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_trial_with_a_bad_value_fails_alone(tiny_shards, tmp_path, sweep_env):
    from mlflow import MlflowClient

    proc = _sweep(sweep_env, tmp_path, f"shards.16={tiny_shards}", "space.data.bin_um.grid=[16]",
                  "space.optim.lr.grid=[0.003,-0.001]", "asha.enabled=false", "name=bad")
    summary = _summary(proc)
    rows = {r["optim.lr"]: r for r in _rows(tmp_path / "bad")}
    assert rows["-0.001"]["status"] == "failed" and "learning rate" in rows["-0.001"]["error"].lower()
    assert rows["0.003"]["status"] == "finished" and int(rows["0.003"]["step"]) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    status = {c.info.run_name: c.info.status for c in _children(client, summary["parent_run_id"])}
    assert status == {rows["-0.001"]["trial"]: "FAILED", rows["0.003"]["trial"]: "FINISHED"}
    assert summary["best"]["trial"] == rows["0.003"]["trial"]

    # the finished sweep resumes (Tuner.restore) into the same parent run, with nothing left to run
    again = _summary(_sweep(sweep_env, tmp_path, f"shards.16={tiny_shards}", "space.data.bin_um.grid=[16]",
                            "space.optim.lr.grid=[0.003,-0.001]", "asha.enabled=false", "name=bad", "--resume"))
    assert again["parent_run_id"] == summary["parent_run_id"]
    assert len(_children(client, summary["parent_run_id"])) == 2


@pytest.mark.parametrize("shards16", [None, "empty"])
def test_resolution_without_shards_is_refused_before_any_trial(tiny_shards, tmp_path, capsys, shards16):
    from launch.sweep import main

    args = ["--config", TINY, f"out_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"shards.8={tiny_shards}"]
    if shards16:
        (tmp_path / shards16).mkdir()
        args.append(f"shards.16={tmp_path / shards16}")
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: ") and "shards.16" in err[0]
    if shards16:
        assert str(tmp_path / shards16 / "16um") in err[0]
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "mlflow.db").exists()

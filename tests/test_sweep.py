"""Ray Tune sweeps (launch/sweep.py) on `tiny_shards`: 4 trials over 8 and 16 um with ASHA, one MLflow
parent with a child per trial, the best model registered as `@sweep-best` and loaded in a fresh
process; a trial with a bad value fails alone; a resolution without shards, or `data.fold`, is refused
up front; a sweep killed with SIGKILL resumes with --resume without running its finished trials again.

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
from conftest import train_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/sweep/tiny.yaml")


@pytest.fixture(scope="module")
def sweep_env() -> dict:
    return train_env(RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1", CI="true", RAY_DEDUP_LOGS="0")


def _cmd(out: Path, *args: str) -> list[str]:
    return [sys.executable, "launch/sweep.py", "--config", TINY, f"out_dir={out}",
            f"mlflow.tracking_uri=sqlite:///{out}/mlflow.db", *args]


def _sweep(env: dict, out: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(out, *args), env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
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

    # a value only the trial can find wrong (the config cannot know timm's model names): that trial fails alone
    space = ['space.model.encoder.grid=["test_resnet","no_such_encoder"]', "space.optim.lr.grid=[0.003]"]
    proc = _sweep(sweep_env, tmp_path, f"shards.16={tiny_shards}", "space.data.bin_um.grid=[16]", *space,
                  "asha.enabled=false", "name=bad")
    summary = _summary(proc)
    rows = {r["model.encoder"]: r for r in _rows(tmp_path / "bad")}
    assert rows["no_such_encoder"]["status"] == "failed" and "unknown timm model" in rows["no_such_encoder"]["error"]
    assert rows["test_resnet"]["status"] == "finished" and int(rows["test_resnet"]["step"]) == 4
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    status = {c.info.run_name: c.info.status for c in _children(client, summary["parent_run_id"])}
    assert status == {rows["no_such_encoder"]["trial"]: "FAILED", rows["test_resnet"]["trial"]: "FINISHED"}
    assert summary["best"]["trial"] == rows["test_resnet"]["trial"]

    # resuming the finished sweep does nothing (the failed trial is not retried) and says so
    again = _sweep(sweep_env, tmp_path, f"shards.16={tiny_shards}", "space.data.bin_um.grid=[16]", *space,
                   "asha.enabled=false", "name=bad", "--resume")
    assert again.stderr.strip() == f"sweep {tmp_path / 'bad'}: finished already, nothing to resume"
    assert _summary(again) == {"parent_run_id": summary["parent_run_id"], "best": summary["best"]}
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


@pytest.mark.parametrize("space, words", [
    ("", "space: empty"),
    ("space.loss.bin_pcc.loguniform=[0.0,0.1]", "space.loss.bin_pcc.loguniform: low must be > 0"),
    ("space.optim.weight_decay.uniform=[0.1,0.01]", "space.optim.weight_decay.uniform: expected numbers low < high"),
    ("space.optim.lr.grid=[0.003,-0.001]", "space.optim.lr.grid: -0.001 is not a valid value"),
    ('space.model.gat_layers.choice=[2,"two"]', "space.model.gat_layers.choice: 'two' is not a valid value"),
])
def test_a_space_that_cannot_run_is_refused_before_ray_starts(tmp_path, capsys, space, words):
    """An empty space ran one default trial and registered it as best; a bad bound or a wrongly typed value
    failed inside Ray and left the sweep without its summary: both refused before Ray starts."""
    import yaml

    from launch.sweep import main

    config = TINY
    if not space:  # the YAML's own space emptied (overrides merge into it)
        config = tmp_path / "empty.yaml"
        config.write_text(yaml.safe_dump({**yaml.safe_load(Path(TINY).read_text()), "space": {},
                                          "train_config": str(REPO / "configs/train/tiny.yaml")}))
    args = ["--config", str(config), f"out_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"shards.8={tmp_path}", f"shards.16={tmp_path}", *([space] if space else [])]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: ") and words in err[0], err
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("where", ["train_config", "train_overrides", "space"])
def test_a_held_out_fold_is_refused_before_ray_starts(tmp_path, capsys, where):
    """data.fold would let Tune choose trials on the held-out fold: refused, naming the file and key."""
    import yaml

    from launch.sweep import main

    base = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    base.setdefault("data", {})["fold"] = 0
    fold_config = tmp_path / "fold.yaml"
    fold_config.write_text(yaml.safe_dump(base))
    extra = {"train_config": [f"train_config={fold_config}"],
             "train_overrides": ['train_overrides=["train.steps=4", "data.fold=1"]'],
             "space": ["space.data.fold.grid=[0, 1]"]}[where]
    args = ["--config", TINY, f"out_dir={tmp_path}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            f"shards.8={tmp_path}", f"shards.16={tmp_path}", *extra]  # refused before the shards are looked at
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: "), err
    named = {"train_config": f"{fold_config}: data.fold: is 0",
             "train_overrides": f"{TINY}: train_overrides: data.fold: is 1", "space": f"{TINY}: space.data.fold: "}[where]
    assert named in err[0] and "held-out fold" in err[0], err[0]
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "mlflow.db").exists()


def _trial_states(sweep_dir: Path) -> dict[str, tuple[str, int]]:
    """Trial id -> (Tune status, step of its last result), from the newest experiment state Tune saved
    in the sweep folder."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"))  # named by the start time of each Tuner.fit
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except json.JSONDecodeError:  # caught while Tune rewrites it
        return {}
    out = {}
    for trial, runtime in data["trial_data"]:
        trial, runtime = json.loads(trial), json.loads(runtime)
        out[trial["trial_id"]] = (trial["status"], (runtime.get("last_result") or {}).get("step", 0))
    return out


@pytest.mark.slow
def test_a_killed_sweep_resumes_without_rerunning_finished_trials(tiny_shards, tmp_path, sweep_env, capsys):
    """Two trials at once, of 3 and 24 steps: SIGKILL the sweep's process group once the short one has
    finished and the long one has saved a checkpoint, then --resume: the finished trial is kept as it is,
    the other goes on from its checkpoint in its MLflow run, the parent run and the registered model are
    the sweep's only ones."""
    import signal
    import time

    import psutil
    from mlflow import MlflowClient

    from launch.sweep import main

    args = (f"shards.16={tiny_shards}", "space.data.bin_um.grid=[16]", "space.optim.lr.grid=[0.003]",
            "space.train.steps.grid=[3,24]", "asha.enabled=false", "name=killed",
            "train_overrides=[train.eval_every=3,train.ckpt_every=3,data.workers=0]")
    sweep_dir, client = tmp_path / "killed", MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    env = {**sweep_env, "TUNE_GLOBAL_CHECKPOINT_S": "1"}  # Tune saves its state every second, not every 10 s
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(_cmd(tmp_path, *args), env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # its own process group: Ray's processes included
    try:
        deadline = time.monotonic() + 240
        while True:  # until Tune has saved one trial as terminated and a result (with a checkpoint) of the other
            log_tail = (tmp_path / "first.log").read_text()[-3000:]
            assert first.poll() is None, "the sweep ended before it was killed: " + log_tail
            assert time.monotonic() < deadline, log_tail
            states = _trial_states(sweep_dir)
            done = [t for t, (status, _) in states.items() if status == "TERMINATED"]
            killed = [t for t, (status, step) in states.items() if status == "RUNNING" and step > 0]
            if done and killed:
                break
            time.sleep(0.25)
    finally:
        spawned = psutil.Process(first.pid).children(recursive=True)  # Ray's trial workers lead groups of their own
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        _, alive = psutil.wait_procs(spawned, timeout=30)
        for proc in alive:
            proc.kill()
    assert not alive, f"processes of the killed sweep still running: {alive}"
    (done,), (killed,) = done, killed
    parent_id = json.loads((sweep_dir / "sweep.json").read_text())["parent_run_id"]
    kept = [sweep_dir / done / "result.json", *(sweep_dir / "runs" / done).rglob("*")]
    kept = {p: p.stat().st_mtime_ns for p in kept}
    before = {c.info.run_name: c for c in _children(client, parent_id)}
    assert before[done].info.status == "FINISHED" and before[killed].info.status == "RUNNING"
    assert client.get_run(parent_id).info.status == "RUNNING" and not (sweep_dir / "summary.csv").exists()

    cli = _cmd(tmp_path, *args)[2:]  # the arguments of launch/sweep.py, for its main() in this process
    capsys.readouterr()
    assert main(cli) == 2  # without --resume
    assert capsys.readouterr().err.strip() == \
        f"magnet: error: {sweep_dir}: name: a sweep of this name exists; pass --resume or another name"

    summary = _summary(_sweep(sweep_env, tmp_path, *args, "--resume"))
    assert summary["parent_run_id"] == parent_id
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert _trial_states(sweep_dir) == {done: ("TERMINATED", 3), killed: ("TERMINATED", 24)}
    rows = {r["trial"]: r for r in _rows(sweep_dir)}
    assert {t: (r["status"], r["step"]) for t, r in rows.items()} == \
        {done: ("finished", "3"), killed: ("finished", "24")}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the finished trial did not run again
    after = _children(client, parent_id)  # one run per trial: the same ones, ended
    assert sorted((c.info.run_name, c.info.run_id, c.info.status) for c in after) == \
        sorted((t, before[t].info.run_id, "FINISHED") for t in (done, killed))
    assert {c.info.run_name: c.info.end_time for c in after}[done] == before[done].info.end_time
    # the killed trial went on from its checkpoint (step 3 or later): Tune's iterations go on, and the steps
    # up to the checkpoint were logged once
    # (Tune appends to result.json; a result it wrote after its last saved state is written again, the same)
    results = [json.loads(line) for line in (sweep_dir / killed / "result.json").read_text().splitlines()]
    pairs = [(r["training_iteration"], r["step"]) for r in results]
    assert pairs == sorted(pairs) and sorted(set(pairs)) == [(i, 3 * i) for i in range(1, 9)]
    steps = [m.step for m in client.get_metric_history(before[killed].info.run_id, "loss")]
    assert set(steps) == set(range(1, 25)) and steps.count(1) == steps.count(2) == steps.count(3) == 1
    best = summary["best"]  # registered once, from the best trial's run
    assert best["run_id"] == before[best["trial"]].info.run_id
    versions = client.search_model_versions("name = 'tiny-sweep'")
    assert [(str(v.version), v.run_id) for v in versions] == [(best["model_version"], best["run_id"])]

    assert main([*cli, "--resume"]) == 0  # a finished sweep: nothing to do
    again = capsys.readouterr()
    assert again.err.strip() == f"sweep {sweep_dir}: finished already, nothing to resume"
    assert json.loads(again.out.strip().splitlines()[-1]) == summary
    assert len(client.search_model_versions("name = 'tiny-sweep'")) == 1


_REPLAY = """
import json, os, sys
from pathlib import Path
from magnet.config import load_config
from magnet.dist import free_port, shutdown
from magnet.sweep.trial import _report_logged
from magnet.train.loop import train
from magnet.train_config import ExperimentConfig
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
cfg = load_config(ExperimentConfig, "configs/train/tiny.yaml", sys.argv[1:])
live, replayed = [], []
train(cfg, report=lambda step, metrics: live.append([step, metrics]))
run_dir = Path(cfg.train.out_dir) / cfg.train.run_name
for upto in (6, 4):
    _report_logged(run_dir, cfg.data.eval_split, upto,
                   lambda step, metrics: replayed.append([upto, step, metrics]))
shutdown()
print(json.dumps({"live": live, "replayed": replayed}))
"""


def test_a_restored_trial_reports_again_what_its_run_logged(tiny_shards, tmp_path):
    """Tune restores a trial from the state it saved last, which can be older than the run's latest
    DeepSpeed checkpoint: the trial reports the evaluations between again from the run's metrics.jsonl.
    They must be what training reported live: the same steps, metric names and values."""
    out = subprocess.run([sys.executable, "-c", _REPLAY, f"data.shards={tiny_shards}", "data.bin_um=16",
                          f"train.out_dir={tmp_path}", "train.run_name=r", "train.steps=6", "train.eval_every=2",
                          "train.ckpt_every=2", "data.workers=0", "mlflow.enabled=false"],
                         env=train_env(), cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    live = got["live"]
    assert [step for step, _ in live] == [2, 4, 6] and "val/pcc_gene" in live[0][1]
    assert [[s, m] for upto, s, m in got["replayed"] if upto == 6] == live
    assert [[s, m] for upto, s, m in got["replayed"] if upto == 4] == live[:2]


def test_a_child_run_left_running_by_a_killed_sweep_is_closed_on_resume(tmp_path):
    """A trial killed before its first checkpoint starts over in a new child run of the same name: on
    --resume the old run (still RUNNING) ends KILLED, and the new one is the one the sweep records."""
    from mlflow import MlflowClient

    from magnet.sweep.results import close_interrupted, record_children

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="sweep").info.run_id
    child = {"tags": {"mlflow.parentRunId": parent}, "run_name": "t1"}
    stale = client.create_run(exp, start_time=1000, **child).info.run_id  # the attempt the kill interrupted
    finished = client.create_run(exp, run_name="t0", tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(finished, "FINISHED")

    assert close_interrupted(uri, parent) == [stale]
    assert client.get_run(stale).info.status == "KILLED"
    assert client.get_run(stale).data.tags["sweep.status"] == "interrupted"
    assert client.get_run(finished).info.status == "FINISHED"

    fresh = client.create_run(exp, start_time=2000, **child).info.run_id  # the resumed sweep's attempt
    rows = [{"trial": t, "status": "finished", "step": 4, "val/loss": 1.0, "error": ""} for t in ("t0", "t1")]
    assert record_children(client, rows, parent, exp, "val/loss") == {"t0": finished, "t1": fresh}
    assert client.get_run(fresh).info.status == "FINISHED"
    assert client.get_run(stale).info.status == "KILLED"


def test_a_closed_form_trial_without_sgd_steps_is_finished(tmp_path):
    """A trial's status comes from its reports, and a closed-form model (model.name=ridge: fitted, step 0) counts
    as finished once its model folder is written; a trial interrupted before that is unfinished. The grid rows
    stand in for Ray's Result objects (the attributes trial_rows reads)."""
    from types import SimpleNamespace

    from magnet.sweep.config import SweepConfig
    from magnet.sweep.results import trial_rows

    cfg = SweepConfig()
    (tmp_path / "runs/t_ridge/model").mkdir(parents=True)
    (tmp_path / "runs/t_ridge/model/model_meta.json").write_text("{}")
    grid = [SimpleNamespace(config={"model.name": name}, metrics={"step": step, "val/loss": 1.0}, error=None,
                            path=str(tmp_path / trial)) for name, step, trial in
            (("ridge", 0, "t_ridge"), ("stnet", 8, "t_stnet"), ("magnet", 4, "t_magnet"))]
    base = SimpleNamespace(train=SimpleNamespace(steps=8))
    status = {r["model.name"]: r["status"] for r in trial_rows(grid, cfg, base, tmp_path)}
    assert status == {"ridge": "finished", "stnet": "finished", "magnet": "unfinished"}

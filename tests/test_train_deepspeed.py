"""Real DeepSpeed engines on the CPU (gloo) over `tiny_shards`: ZeRO 1/2/3 with 2 processes, one rank
killed and the run resumed, one plain process (skipping a corrupt shard), two torchrun node ranks
over loopback, the registered MLflow model in a fresh process, no credential from the environment
recorded, a checkpoint that would unpickle code refused, a refused manifest, a corrupt shard met by
the training statistics.

Every run is a subprocess (`magnet train` starts the deepspeed launcher, or `python launch/train.py`),
sharing one TORCH_EXTENSIONS_DIR under build/ so DeepSpeed's shm op compiles once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import train_env

from magnet.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/train/tiny.yaml")
STEPS = 6
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def ds_env() -> dict:
    return train_env(PYTHONUNBUFFERED="1")


def _args(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    # the engines' tests check that the loss falls from the plain random init (model.init_from_data=false):
    # from the training mean, 6 steps at the tiny config's lr do not reliably improve on it;
    # test_training_starts_at_the_training_mean covers the initialisation in the loop
    return ["--config", TINY, f"data.shards={shards}", f"train.out_dir={out}", f"train.run_name={name}",
            f"train.steps={STEPS}", "model.init_from_data=false", *extra]


def _magnet_train(port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "magnet", "train", "--nproc", "2", "--master-port", str(port), *args]


def _release_shm(port: int) -> None:
    for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
        p.unlink()


def _run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert "terminate called" not in proc.stderr + proc.stdout
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _losses(run_dir: Path) -> dict[int, float]:
    """Loss per optimizer step; each step appears once (a resumed run drops the killed run's extra rows)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _assert_trained(run_dir: Path) -> None:
    loss = _losses(run_dir)
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert min(loss[STEPS - 1], loss[STEPS]) < loss[1]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"
    assert (run_dir / "model" / "model.safetensors").is_file()


# credentials in the environment of a run: none may reach its logs, run folder or MLflow store
SECRETS = {"MLFLOW_TRACKING_PASSWORD": "pw-6d1f0c", "AWS_SECRET_ACCESS_KEY": "aws-9b7e2a", "HF_TOKEN": "hf-0e5a77"}


@pytest.fixture(scope="module")
def zero2_run(tiny_shards, tmp_path_factory, ds_env):
    """Uninterrupted ZeRO-2 run, checkpoints every 3 steps, model registered as `tiny@champion`."""
    out = tmp_path_factory.mktemp("runs")
    uri = f"sqlite:///{out}/mlruns.db"
    port = free_port()
    proc = _run(_magnet_train(port, *_args(tiny_shards, out, "ref", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
                                            "mlflow.register_as=tiny", "mlflow.alias=champion", "train.eval_every=3")),
                {**ds_env, **SECRETS, "MLFLOW_TRACKING_USERNAME": "alice"})
    _release_shm(port)
    (out / "launcher.log").write_text(proc.stdout + proc.stderr)
    return out / "ref", uri


def test_no_credential_from_the_environment_is_recorded(zero2_run):
    run_dir, uri = zero2_run
    files = [p for p in run_dir.parent.rglob("*") if p.is_file()]
    assert any(p.name == "mlruns.db" for p in files) and any(p.name == "model.safetensors" for p in files)
    blob = b"".join(p.read_bytes() for p in files)  # logs, run folder, MLflow database and artifacts
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.search_runs([client.get_experiment_by_name("magnet-tiny").experiment_id])[0]
    recorded = [*run.data.params.values(), *run.data.tags.values()]
    assert run.data.params["train.steps"] == str(STEPS) and run.data.metrics["data/corrupt_samples"] == 0
    for secret in SECRETS.values():
        assert secret.encode() not in blob and not any(secret in v for v in recorded)


def test_zero2_trains_logs_to_mlflow_and_registers(zero2_run, tiny_shards):
    run_dir, uri = zero2_run
    _assert_trained(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    cpu = [r["cpu_s"] for r in rows if r["kind"] == "train"]  # the learning curves' compute axis
    assert cpu[0] > 0 and all(b >= a for a, b in zip(cpu, cpu[1:])), cpu
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias("tiny", "champion")
    run = client.get_run(version.run_id)
    assert run.data.params["train.steps"] == str(STEPS)
    genes = json.loads((tiny_shards / "16um" / "manifest.json").read_text())["genes"]
    assert client.download_artifacts(version.run_id, "genes.txt", str(run_dir.parent)) and \
        (run_dir.parent / "genes.txt").read_text().split() == genes
    history = client.get_metric_history(version.run_id, "loss")
    assert [m.step for m in history] == list(range(1, STEPS + 1))
    assert "val/pcc_bin" in run.data.metrics
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "val"]
    assert [r["step"] for r in evals] == [3, 6]
    best = min(evals, key=lambda r: r["loss"])["step"]  # train.best_metric=loss, best_mode=min
    assert (run_dir / "checkpoints" / "best").read_text() == f"best-step{best:08d}"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "figures")}
    assert "figures/loss_curves.png" in artifacts and any("gene_maps" in a for a in artifacts)


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_stops_cleanly(stage, tiny_shards, tmp_path, ds_env):
    port = free_port()
    _run(_magnet_train(port, *_args(tiny_shards, tmp_path, "z", f"train.deepspeed=zero{stage}")), ds_env)
    _release_shm(port)
    _assert_trained(tmp_path / "z")
    # the weights gathered from the ranks' partitions reproduce the engine's output
    from magnet.registry.pyfunc import MagnetPyfunc

    folder = tmp_path / "z" / "model"
    model = MagnetPyfunc()
    model.load(str(folder / "model.safetensors"), str(folder / "model_meta.json"), str(folder / "config.yaml"))
    pred = model.predict(None, dict(np.load(folder / "example_input.npz")))
    engine_out = np.load(folder / "example_output.npz")
    np.testing.assert_allclose(pred["bin"], engine_out["bin"], rtol=1e-5, atol=1e-6)


def _rank_pid(pgid: int, rank: int) -> int:
    """The training process of ``rank`` among the processes of group ``pgid`` (by its RANK variable)."""
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and os.getpgid(int(proc_dir.name)) == pgid and \
                    f"RANK={rank}".encode() in (proc_dir / "environ").read_bytes().split(b"\0"):
                return int(proc_dir.name)
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
    raise AssertionError(f"no process with RANK={rank} in group {pgid}")


def test_resume_after_kill_gives_the_same_losses(zero2_run, tiny_shards, tmp_path, ds_env):
    """SIGKILL of one rank after the step-3 checkpoint: the job fails on its own within a bounded time
    (the survivor's collective errors out, the launcher stops), then --resume latest gives the same losses."""
    ref_dir, _ = zero2_run
    port = free_port()
    cmd = _magnet_train(port, *_args(tiny_shards, tmp_path, "k", "train.eval_every=3"))
    proc = subprocess.Popen(cmd, env=ds_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    watchdog = threading.Timer(300, os.killpg, (proc.pid, signal.SIGKILL))  # a hang fails, never blocks
    watchdog.start()
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "checkpoint saved step 3" in line:
            os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
            killed_at = time.monotonic()
            break
    seen += proc.stdout.readlines()  # to the launcher's exit
    rc = proc.wait(timeout=60)
    failed_after = time.monotonic() - killed_at
    watchdog.cancel()
    proc.stdout.close()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # nothing may be left of the group
    except ProcessLookupError:
        pass
    _release_shm(port)
    assert rc not in (0, -signal.SIGKILL), "".join(seen[-30:])  # failed by itself, not by the watchdog
    assert failed_after < 120, failed_after
    assert (tmp_path / "k" / "checkpoints" / "latest").read_text() == "step00000003"

    # an override the weights cannot take is refused before anything of the run is rewritten
    def files() -> dict:  # the killed run's lock is stale (its owner is gone): taken over, then released
        return {p: p.read_bytes() for p in (tmp_path / "k").rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    proc = subprocess.run(_magnet_train(free_port(), "--resume", "latest", *_args(tiny_shards, tmp_path, "k", "model.width=64")),
                          env=ds_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"{tmp_path / 'k' / 'config.yaml'}: model.width: the run was trained with 32; resuming with 64" in proc.stderr
    assert files() == before and not (tmp_path / "k" / ".lock").exists()

    port = free_port()
    _run(_magnet_train(port, "--resume", "latest", *_args(tiny_shards, tmp_path, "k", "train.eval_every=3")), ds_env)
    _release_shm(port)
    ref, resumed = _losses(ref_dir), _losses(tmp_path / "k")
    for step in range(4, STEPS + 1):
        assert resumed[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, ref, resumed)


def test_second_training_on_a_run_in_use_is_refused(tiny_shards, tmp_path, ds_env):
    """Two trainings on one run name interleaved their metrics and checkpoints: the second is refused within seconds,
    before it launches anything, and the first runs to the end untouched."""
    port = free_port()
    first = subprocess.Popen(_magnet_train(port, *_args(tiny_shards, tmp_path, "busy")), env=ds_env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "busy" / ".lock"
    deadline = time.monotonic() + 240
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), "the first training never took its run folder"
    started = time.monotonic()
    second = subprocess.run(_magnet_train(free_port(), *_args(tiny_shards, tmp_path, "busy")), env=ds_env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    refused_in = time.monotonic() - started
    still_running = first.poll() is None
    out, _ = first.communicate(timeout=300)
    _release_shm(port)
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"{tmp_path / 'busy'}: train.run_name: in use by pid" in second.stderr
    assert still_running and refused_in < 5, (still_running, refused_in)
    assert first.returncode == 0, out[-3000:]
    _assert_trained(tmp_path / "busy")  # every step once: nothing interleaved
    assert not lock.exists()


def test_interrupted_training_is_one_line(tiny_shards, tmp_path, ds_env):
    """Ctrl-C (SIGINT to the process group) during training printed tracebacks from every process."""
    # Ctrl-C's default action, also when the suite itself was started in the background (where SIGINT is ignored)
    proc = subprocess.Popen([sys.executable, "launch/train.py", *_args(tiny_shards, tmp_path, "int", "train.steps=500")],
                            env=ds_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:
        if line.startswith("magnet train: run"):
            break
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert [line for line in err.splitlines() if line.startswith("magnet: error: ")] == [
        "magnet: error: interrupted; the checkpoints written so far are kept (--resume latest)"]


def test_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    from magnet.errors import UserError
    from magnet.train import rundir

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": 0}))
    rundir.acquire(run)  # its owner is gone
    assert json.loads((run / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    rundir.release(run)
    assert not (run / rundir.LOCK_NAME).exists()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for host in (os.uname().nodename, "another-node"):
            (run / rundir.LOCK_NAME).write_text(json.dumps({"host": host, "pid": alive.pid, "started": 0}))
            with pytest.raises(UserError, match=f"in use by pid {alive.pid} on {host}"):
                rundir.acquire(run)
    finally:
        alive.kill()


def test_one_plain_process_without_launcher(tiny_shards, tmp_path, ds_env):
    """Also: a corrupt training shard with data.on_corrupt=skip is skipped, warned about and counted."""
    from shard_damage import corrupt

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards / "16um", shards / "16um")
    for bad in sorted((shards / "16um").glob("train-*.tar"))[:-1]:  # all but one: read within the 6 steps
        corrupt(bad, "flip_jpg")
    proc = _run([sys.executable, "launch/train.py", *_args(shards, tmp_path, "one", "train.deepspeed=zero1",
                                                          "train.ckpt_every=2", "train.keep_last=2",
                                                          "data.on_corrupt=skip")], ds_env)
    _assert_trained(tmp_path / "one")
    assert "world 1" in proc.stdout
    assert "train-000000.tar: sha256: does not match manifest.json; skipped 8 sample(s)" in proc.stderr
    counts = [json.loads(line).get("data/corrupt_samples") for line in (tmp_path / "one/metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert counts == sorted(counts) and counts[-1] >= 8
    kept = sorted(p.name for p in (tmp_path / "one" / "checkpoints").glob("step*"))
    assert kept == ["step00000004", "step00000006"]  # step 2 pruned: keep the last 2


def test_corrupt_shard_meets_the_training_statistics_first(tiny_shards, tmp_path, ds_env):
    """model.init_from_data (the default) reads the training shards before the stream does, through the
    same checked reader: under data.on_corrupt=skip a flipped byte is skipped and training completes;
    under fail it stops in one line naming the shard's sha256 (not a zstd error of the statistics pass)."""
    from shard_damage import corrupt

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards / "16um", shards / "16um")
    corrupt(shards / "16um" / "train-000000.tar", "flip_npy")
    common = ("train.deepspeed=zero1", "train.steps=2", "model.init_from_data=true")
    proc = _run([sys.executable, "launch/train.py", *_args(shards, tmp_path, "skip", *common, "data.on_corrupt=skip")],
                ds_env)
    assert "train-000000.tar: sha256: does not match manifest.json; skipped" in proc.stderr
    assert (tmp_path / "skip" / "model" / "model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "launch/train.py", *_args(shards, tmp_path, "fail", *common)],
                          env=ds_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "train-000000.tar: sha256: does not match manifest.json" in err
    assert "zstd" not in proc.stderr.lower() and "Traceback" not in proc.stderr


def test_training_starts_at_the_training_mean(zero2_run, tiny_shards, tmp_path, ds_env):
    """model.init_from_data (the default): the registered weights hold the training split's feature
    statistics, and the first loss is far below the random init's (same seed, same first batches)."""
    from safetensors.torch import load_file

    from magnet.data.pipeline import ShardSet
    from magnet.models.init import training_statistics

    _run([sys.executable, "launch/train.py", *_args(tiny_shards, tmp_path, "init", "train.deepspeed=zero1",
                                                    "train.steps=1", "model.init_from_data=true")], ds_env)
    stats = training_statistics(ShardSet(str(tiny_shards), 16, None, None), "train")
    weights = load_file(str(tmp_path / "init" / "model" / "model.safetensors"))
    for level in ("spot", "glob"):
        assert np.allclose(weights[f"feat_scale.{level}.mean"].numpy(), stats[f"{level}_mean"].numpy(), atol=1e-6)
    random_init = _losses(zero2_run[0])[1]
    assert _losses(tmp_path / "init")[1] < 0.6 * random_init


def test_registered_model_predicts_like_the_engine(zero2_run, ds_env):
    run_dir, uri = zero2_run
    code = (
        "import sys, numpy as np, mlflow\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "m = mlflow.pyfunc.load_model('models:/tiny@champion')\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "out = m.predict(x)\n"
        "np.savez(sys.argv[3], **out)\n"
    )
    pred_path = run_dir.parent / "pyfunc_pred.npz"
    _run([sys.executable, "-c", code, uri, str(run_dir / "model" / "example_input.npz"), str(pred_path)], ds_env)
    engine_out = np.load(run_dir / "model" / "example_output.npz")
    pred = np.load(pred_path)
    assert set(pred.files) == set(engine_out.files) >= {"bin"}
    for k in engine_out.files:
        assert pred[k].shape == engine_out[k].shape
        np.testing.assert_allclose(pred[k], engine_out[k], rtol=1e-5, atol=1e-6)
    assert np.abs(engine_out["bin"]).sum() > 0


def test_registered_model_pins_its_requirements(zero2_run):
    import importlib.metadata

    import mlflow

    _, uri = zero2_run
    mlflow.set_tracking_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/tiny@champion"))
    reqs = (folder / "requirements.txt").read_text().split()
    assert f"torch=={importlib.metadata.version('torch')}" in reqs
    assert any(r.startswith("torch-geometric==") for r in reqs)


def test_registry_promote_sets_an_alias(zero2_run, capsys):
    from mlflow import MlflowClient

    from magnet.cli import main

    _, uri = zero2_run
    assert main(["registry", "promote", "tiny", "1", "--alias", "staging", "--tracking-uri", uri]) == 0
    assert str(MlflowClient(tracking_uri=uri).get_model_version_by_alias("tiny", "staging").version) == "1"
    assert main(["registry", "promote", "tiny", "99", "--tracking-uri", uri]) == 2
    assert "tiny version 99" in capsys.readouterr().err


def test_two_nodes_over_loopback(tiny_shards, tmp_path, ds_env):
    """Two `torchrun --nnodes 2` node ranks on this machine, one process each, one shared run folder."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(port), "launch/train.py",
           *_args(tiny_shards, tmp_path, "two", "train.deepspeed=zero2")]
    nodes = [subprocess.Popen([*cmd[:3], "--node_rank", str(r), *cmd[3:]], env=ds_env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=300)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                os.killpg(n.pid, signal.SIGKILL)
    _release_shm(port)
    assert [n.returncode for n in nodes] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "world 2" in outs[0]
    _assert_trained(tmp_path / "two")


def test_checkpoint_that_unpickles_code_is_refused(zero2_run, tiny_shards, tmp_path, ds_env):
    """Checkpoints load with torch.load(weights_only=True): a pickled callable is refused, never run."""
    import torch

    ref_dir, _ = zero2_run
    run = tmp_path / "p"
    shutil.copytree(ref_dir / "checkpoints", run / "checkpoints")
    config = (ref_dir / "config.yaml").read_text()  # trained by 2 ranks; resumed here by one plain process, so
    (run / "config.yaml").write_text(config.replace("world_size: 2", "world_size: 1"))  # the load is reached
    marker = tmp_path / "pwned"
    torch.save({"x": Exploit(str(marker))}, run / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt")
    proc = subprocess.run([sys.executable, "launch/train.py", "--resume", "latest",
                           *_args(tiny_shards, tmp_path, "p", "train.steps=7")],
                          env=ds_env, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists()
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "step00000006: refused to load (not weights only)" in err


class Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_manifest_with_other_genes_is_refused(tiny_shards, tmp_path, ds_env):
    proc = subprocess.run([sys.executable, "launch/train.py", *_args(tiny_shards, tmp_path, "g", "data.genes=[AAA,BBB]")],
                          env=ds_env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "manifest.json: genes:" in err and "'AAA'" in err
    assert not (tmp_path / "g" / "checkpoints" / "latest").exists()

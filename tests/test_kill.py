"""Killed and crashed trainings: a SIGKILL of `magnet train` ends its launcher and both ranks within seconds
(they trained on, writing checkpoints); a rank that dies mid-run leaves its MLflow run FAILED (it was
recorded FINISHED), and resuming that 2-process run with 1 process is refused in one line. Real `magnet train`
subprocesses over gloo."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import train_env

from magnet.dist import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/train/tiny.yaml")
pytestmark = pytest.mark.slow


def _start(tmp_path: Path, shards: Path, port: int, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "magnet", "train", "--nproc", "2", "--master-port", str(port), "--config", TINY,
           f"data.shards={shards}", f"train.out_dir={tmp_path}", "train.run_name=k", "model.init_from_data=false",
           *extra]
    return subprocess.Popen(cmd, env=train_env(PYTHONUNBUFFERED="1"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError("".join(seen[-30:]))


def _ranks(pid: int) -> dict[str, psutil.Process]:
    """The training processes under ``pid`` by their RANK (data loader workers inherit it: the oldest wins)."""
    found: dict[str, psutil.Process] = {}
    for p in sorted(psutil.Process(pid).children(recursive=True), key=lambda p: p.create_time()):
        try:
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "launch/train.py" in " ".join(p.cmdline()):
            found.setdefault(rank, p)
    return found


def _cleanup(proc: subprocess.Popen, port: int) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.stdout.close()
    for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"):
        p.unlink()


def test_sigkill_of_magnet_train_ends_the_launcher_and_ranks(tiny_shards, tmp_path):
    port = free_port()
    proc = _start(tmp_path, tiny_shards, port, "train.steps=500")
    watchdog = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))  # a hang fails, never blocks
    watchdog.start()
    try:
        _wait_for(proc, "magnet train: run")  # both ranks are up
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert sorted(_ranks(proc.pid)) == ["0", "1"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs(tree, timeout=10)
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, [" ".join(p.cmdline())[:120] for p in alive]
    finally:
        watchdog.cancel()
        _cleanup(proc, port)


def test_crashed_rank_fails_the_mlflow_run_and_resume_needs_the_same_world_size(tiny_shards, tmp_path):
    port = free_port()
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    proc = _start(tmp_path, tiny_shards, port, "train.steps=50", "train.ckpt_every=1", "mlflow.enabled=true",
                  f"mlflow.tracking_uri={uri}")
    watchdog = threading.Timer(600, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        _wait_for(proc, "checkpoint saved step 1")
        _ranks(proc.pid)["1"].kill()  # during the next step or its checkpoint
        rest = proc.stdout.read()
        rc = proc.wait(timeout=120)
    finally:
        watchdog.cancel()
        _cleanup(proc, port)
    assert rc not in (0, -signal.SIGKILL), rest[-3000:]
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        assert [r[0] for r in db.execute("select status from runs")] == ["FAILED"]

    cmd = [sys.executable, "launch/train.py", "--resume", "latest", "--config", TINY, f"data.shards={tiny_shards}",
           f"train.out_dir={tmp_path}", "train.run_name=k", "model.init_from_data=false", "train.steps=50",
           "train.ckpt_every=1"]
    started = time.monotonic()
    res = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    errors = [line for line in res.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert errors == [f"magnet: error: {tmp_path / 'k' / 'config.yaml'}: world_size: the run was trained by 2 "
                      "processes; resuming with 1 would not match its checkpoint (resume with 2 processes, e.g. "
                      "--nproc 2)"], (errors, time.monotonic() - started)

"""Mistyped input to each command, walked as a table: exit status 2, one line `magnet: error:` naming the
file or field, no traceback, nothing left behind, and a failure in seconds, not minutes (an unreachable
tracking server took about 4 minutes; a mistyped sqlite path created folders and an empty database)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magnet.dist import free_port

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:{port}"  # a loopback port nothing listens on


def _cases(tmp: Path, port: int) -> dict[str, tuple[list[str], str]]:
    dead = DEAD.format(port=port)
    missing_db = f"sqlite:///{tmp}/no/such/folder/mlruns.db"
    tiny = str(REPO / "configs/train/tiny.yaml")
    return {
        "registry: mistyped sqlite path": (
            ["magnet", "registry", "promote", "m", "1", "--tracking-uri", missing_db], "database file not found"),
        "registry: unreachable server": (
            ["magnet", "registry", "promote", "m", "1", "--tracking-uri", dead], "no tracking server answers"),
        "predict: unreachable server": (
            ["magnet", "predict", "--model", "models:/m@champion", "--tracking-uri", dead, "--image", tiny, "--mpp",
             "0.5", "--out", str(tmp / "p.h5ad")], "no tracking server answers"),
        "predict: s3 model without its client": (
            ["magnet", "predict", "--model", "s3://bucket/model", "--image", tiny, "--mpp", "0.5",
             "--out", str(tmp / "p.h5ad")], "needs the Python package 'boto3'"),
        "train: unreachable server": (
            ["magnet", "train", "--config", tiny, f"train.out_dir={tmp / 'runs'}", "mlflow.enabled=true",
             f"mlflow.tracking_uri={dead}"], "mlflow.tracking_uri: no tracking server answers"),
        "train: NaN learning rate": (
            ["magnet", "train", "--config", tiny, f"train.out_dir={tmp / 'runs'}", "optim.lr=nan"], "optim.lr"),
        "sweep: unreachable server": (
            [str(REPO / "launch/sweep.py"), "--config", str(REPO / "configs/sweep/tiny.yaml"), f"out_dir={tmp / 'sweeps'}",
             f"mlflow.tracking_uri={dead}"], "mlflow.tracking_uri: no tracking server answers"),
    }


CASE_NAMES = list(_cases(Path("/x"), 1))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_in_seconds(case, tmp_path):
    argv, words = _cases(tmp_path, free_port())[case]
    cmd = [sys.executable, "-m", "magnet", *argv[1:]] if argv[0] == "magnet" else [sys.executable, *argv]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert took < 60, took  # generous for a loaded 2-core machine; the unreachable server took about 240 s
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))

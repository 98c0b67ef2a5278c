"""Training failures that printed tracebacks, now one line: an unwritable `train.out_dir` (refused by
`magnet train` before anything is launched) and a disk that fills up at the first checkpoint (a real 4 MiB
tmpfs; needs mount rights, else skipped), whose MLflow run is then recorded FAILED."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import train_env

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/train/tiny.yaml")


def _tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()[:100]}")


@pytest.mark.parametrize("where", ["below_a_file", "read_only"])
def test_unwritable_out_dir_is_refused_before_launch(where, tiny_shards, tmp_path):
    if where == "below_a_file":
        (tmp_path / "file").write_text("x")
        out, expect = tmp_path / "file" / "runs", f"{tmp_path / 'file'} is not a folder"
    else:
        _tmpfs(tmp_path / "ro", "ro,size=1m")
        out, expect = tmp_path / "ro" / "runs", f"{tmp_path / 'ro'} is not writable (Read-only file system)"
    try:
        started = time.monotonic()
        res = subprocess.run([sys.executable, "-m", "magnet", "train", "--config", TINY, f"data.shards={tiny_shards}",
                              f"train.out_dir={out}"], env=train_env(), cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        took = time.monotonic() - started
    finally:
        if where == "read_only":
            subprocess.run(["umount", str(tmp_path / "ro")], check=True)
    assert res.returncode == 2 and res.stderr.strip() == f"magnet: error: {out}: train.out_dir: {expect}", res.stderr
    assert "magnet train: run" not in res.stdout and took < 60  # no rank was started


@pytest.mark.slow
def test_disk_full_at_checkpoint_is_one_line_and_fails_the_run(tiny_shards, tmp_path):
    disk = tmp_path / "disk"
    _tmpfs(disk, "size=4m")  # the tiny ZeRO-1 checkpoint takes about 7 MB
    try:
        cmd = [sys.executable, "launch/train.py", "--config", TINY, f"data.shards={tiny_shards}",
               f"train.out_dir={disk}", "train.run_name=full", "train.steps=2", "train.ckpt_every=1",
               "train.deepspeed=zero1",
               "mlflow.enabled=true", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlruns.db"]
        res = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=400)
        left = sorted(p.name for p in disk.rglob("*"))
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    errors = [line for line in res.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(errors) == 1, errors
    assert re.fullmatch(rf"magnet: error: {re.escape(str(disk / 'full' / 'checkpoints' / 'step00000001'))}: "
                        r"train\.out_dir: the checkpoint could not be written \((No space left on device|"
                        r"a file was not written in full, \d+ KiB free on its disk)\); no checkpoint was kept",
                        errors[0]), errors
    assert left == []  # the partial checkpoint and the run folder without a checkpoint are gone
    with sqlite3.connect(tmp_path / "mlruns.db") as db:
        assert [r[0] for r in db.execute("select status from runs")] == ["FAILED"]

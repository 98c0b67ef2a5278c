"""magnet/io.py: temporary names carry the writer's pid and host; the next writer of an output removes what a dead
writer on this host left, never a live writer's nor another host's; outputs are checked before work; a SIGTERM
renames nothing, even one whose exception Python dropped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest

from magnet.errors import UserError
from magnet.io import atomic_path, atomic_write_text, check_output, exit_on_sigterm, remove_stale, tmp_name


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # reaped: no process has this pid now
    return proc.pid


def _left_by(folder, name: str, pid: int, host: str | None = None, folder_tmp: bool = False):
    path = folder / tmp_name(name).replace(f"-{os.getpid()}-{socket.gethostname()}-",
                                           f"-{pid}-{host or socket.gethostname()}-")
    if folder_tmp:
        path.mkdir()
        (path / "part").write_text("half")
    else:
        path.write_text("half")
    return path


def test_the_next_writer_removes_only_a_dead_writers_temporary_paths(tmp_path):
    dead = _dead_pid()
    stale_file = _left_by(tmp_path, "p.h5ad", dead)
    stale_dir = _left_by(tmp_path, "p.h5ad", dead, folder_tmp=True)
    live = _left_by(tmp_path, "p.h5ad", os.getpid())  # a writer still running (this process)
    other_host = _left_by(tmp_path, "p.h5ad", dead, host="another-host.example")  # cannot be judged from here
    other_output = _left_by(tmp_path, "q.h5ad", dead)  # another output's: its own next writer removes it
    mine = tmp_path / ".p.h5ad.tmp"  # not a name atomic_path gives
    mine.write_text("a user's file")
    atomic_write_text(tmp_path / "p.h5ad", "complete")
    assert (tmp_path / "p.h5ad").read_text() == "complete"
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other_host.exists() and other_output.exists() and mine.exists()
    assert remove_stale(tmp_path) == [other_output]  # the whole folder (what sharding and a cohort do)


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.magnet-tmp-{os.getpid()}-{socket.gethostname()}-")
        tmp.mkdir()
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def _drop_a_sigterm(monkeypatch) -> list:
    """A SIGTERM handled while a weakref callback runs: Python drops the handler's SystemExit there, as in any
    finaliser, and the program goes on (how a terminated prediction once exited 0 with its output renamed)."""
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)
    box = type("Box", (), {})()
    ref = weakref.ref(box, lambda _: signal.raise_signal(signal.SIGTERM))  # noqa: F841 (alive when box dies)
    del box
    return dropped


@pytest.mark.parametrize("folder", [False, True])
def test_a_sigterm_that_python_dropped_still_stops_the_rename(tmp_path, monkeypatch, folder):
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, exit_on_sigterm(), atomic_path(out) as tmp:
        written = tmp / "part" if folder else tmp
        written.parent.mkdir(exist_ok=True)
        written.write_text("half")
        dropped = _drop_a_sigterm(monkeypatch)
        assert [d.exc_type for d in dropped] == [SystemExit]  # the block went on
        written.write_text("whole")
    assert stopped.value.code == 143
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_terminated_training_registers_nothing(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from magnet.registry.tracking import Tracker
    from magnet.train_config import MlflowConfig

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracker = Tracker(MlflowConfig(tracking_uri=uri, experiment="t", register_as="m"), active=True)
    tracker.start("r", {}, {})
    with pytest.raises(SystemExit) as stopped, exit_on_sigterm():
        _drop_a_sigterm(monkeypatch)
        tracker.log_model(python_model=None, artifacts={}, signature=None)
    tracker.finish("FAILED")
    assert stopped.value.code == 143
    assert MlflowClient(uri).search_registered_models() == []


@pytest.mark.parametrize("make, path, folder, overwrite, words", [
    ("file", "x", False, False, "x: --out: exists; pass --overwrite"),
    ("dir", "x", False, True, "x: --out: is a directory; expected a file"),
    ("file", "x", True, True, "x: --out: is a file; expected a folder"),
    ("file", "x/y", False, False, "is a file, not a directory"),
    ("full", "x", True, False, "x: --out: exists; pass --overwrite"),
])
def test_outputs_are_checked(tmp_path, monkeypatch, make, path, folder, overwrite, words):
    monkeypatch.chdir(tmp_path)
    if make == "file":
        (tmp_path / "x").write_text("mine")
    else:
        (tmp_path / "x").mkdir()
        if make == "full":
            (tmp_path / "x" / "f").write_text("mine")
    with pytest.raises(UserError, match=words):
        check_output(Path(path), "--out", overwrite, folder=folder)


def test_outputs_that_may_be_written(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "p.h5ad", "--out", False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", "--out", False, folder=True)  # an empty folder is not an output yet
    (tmp_path / "p.h5ad").write_text("old")
    check_output(tmp_path / "p.h5ad", "--out", True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "p.h5ad"]  # checking created nothing

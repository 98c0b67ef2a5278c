"""Run a command so that it, and every process it starts, ends with the caller:
``python -m magnet.train.guard PARENT_PID CMD...`` (``magnet train`` starts its launcher this way).

A SIGKILL of ``magnet train`` left the DeepSpeed launcher and its ranks training: the launcher, its per-node
launcher and torchrun ask for no parent-death signal for their children, and a parent-death signal only
reaches a direct child. So this process sits between: the kernel sends it SIGTERM when its parent dies
(``PR_SET_PDEATHSIG``), it adopts every orphaned descendant (``PR_SET_CHILD_SUBREAPER``), and on that signal,
or when the command ends, it ends the whole tree (SIGTERM, then SIGKILL after a grace period). Linux only;
elsewhere the command just runs.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

import psutil

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
GRACE_S = 5.0


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def end_tree(grace: float = GRACE_S) -> None:
    """SIGTERM every descendant (the launchers then stop their ranks themselves), SIGKILL what is left."""
    procs = psutil.Process().children(recursive=True)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive + psutil.Process().children(recursive=True):  # and any started meanwhile
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=grace)  # reap the adopted ones


def _stop(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    parent, cmd = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C reaches the launcher and ranks too: they stop themselves
    if os.getppid() != parent:  # the parent died before the death signal was asked for
        return 1
    try:
        rc = subprocess.Popen(cmd).wait()
    finally:
        end_tree()
    return 128 - rc if rc < 0 else rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""One process owns a run folder at a time, and a resumed run keeps the config its weights were trained with.

The lock is a file ``.lock`` in the run folder holding the owner's host, pid and process start time, created
with O_EXCL before anything else is written there. A lock whose owner is gone (same host, pid not running,
or running but started at another time: a reused pid) is stale and taken over; an owner on another host
cannot be checked from here, so it is refused with the path to delete if that process is gone.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from magnet.errors import UserError

LOCK_NAME = ".lock"
_held: dict[Path, Path | None] = {}  # run folders this process holds -> the top folder it created for it, or None
# keys a resumed run may change: how long it runs, how it logs and where it reports, not what it learns
RESUMABLE = ("train.steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_last",
             "train.progress", "train.out_dir", "train.run_name", "data.shards", "data.workers", "data.prefetch",
             "data.eval_batch", "data.on_corrupt", "mlflow.")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), or None where it cannot be read."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, under another user
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


def owner_of(run_dir: Path) -> dict | None:
    """The live owner of ``run_dir`` (host, pid, started), or None when it is free or its lock is stale."""
    path = Path(run_dir) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant, or damaged: only its age tells
        try:
            started = path.stat().st_mtime
        except FileNotFoundError:
            return None
        return {"host": "?", "pid": "?", "started": started} if time.time() - started < 30 else None
    if owner.get("host") != socket.gethostname():
        return owner
    if owner.get("pid") == os.getpid():
        return None  # an earlier run in this process that ended without releasing (a Ray worker reused)
    return owner if _alive(owner) else None


def refuse_if_owned(run_dir: Path) -> None:
    owner = owner_of(run_dir)
    if owner is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
        raise UserError(f"{run_dir}: train.run_name: in use by pid {owner.get('pid')} on {owner.get('host')} since "
                        f"{since}; wait for it or choose another train.run_name (delete {Path(run_dir) / LOCK_NAME} "
                        "only if that process is gone)")


def acquire(run_dir: Path) -> Path:
    """Take the run folder for this process (creating it); released by :func:`release` or :func:`release_all`."""
    run_dir = Path(run_dir)
    created = None
    for folder in (run_dir, *run_dir.parents):  # the top folder created here (train.out_dir too, if new)
        if folder.exists():
            break
        created = folder
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
          "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            refuse_if_owned(run_dir)
            path.unlink(missing_ok=True)  # stale: its owner is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        _held[run_dir] = created
        return path
    refuse_if_owned(run_dir)  # another process took it between our unlink and create
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
    raise UserError(f"{path}: lock: could not be taken")


def check_writable(out: Path, field: str) -> None:
    """``out`` (or the nearest folder above it that exists) takes a new file: tried, since permission bits say
    nothing for root or on a read-only mount; refused in one line before anything is launched."""
    base = out.absolute()
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise UserError(f"{out}: {field}: {base} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".magnet-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{out}: {field}: {base} is not writable ({e.strerror})") from None


def release(run_dir: Path) -> None:
    """Remove the lock if this process holds it. A folder this process created that holds no checkpoint (the run
    failed before its first one) goes too: a config.yaml beside an empty checkpoints/ only misleads."""
    run_dir = Path(run_dir)
    created = _held.pop(run_dir, None)
    path = run_dir / LOCK_NAME
    try:
        if json.loads(path.read_text()).get("pid") != os.getpid():
            return
    except (OSError, ValueError):
        return  # already gone or not ours to judge
    path.unlink()
    if created is not None and not (run_dir / "checkpoints" / "latest").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        for folder in run_dir.parents:  # the folders created for it, while nothing else is in them
            if folder == created.parent or any(folder.iterdir()):
                break
            folder.rmdir()


@atexit.register
def release_all() -> None:
    """Release every run folder this process holds (``launch/train.py`` calls it before ``os._exit``, which skips atexit)."""
    for run_dir in list(_held):
        release(run_dir)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("normalisation", "folds"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(saved: dict, new: dict, path: Path) -> None:
    """Refuse a resume whose config differs from the saved run's in anything but :data:`RESUMABLE`, naming the key,
    before anything is written: the weights and optimizer state belong to the saved config."""
    old, cur = _flat(saved), _flat(new)
    for key in sorted(set(old) | set(cur)):
        if old.get(key) != cur.get(key) and not key.startswith(RESUMABLE):
            raise UserError(f"{path}: {key}: the run was trained with {old.get(key)!r}; resuming with {cur.get(key)!r} "
                            "would not match its weights (resume without that override, or start another run)")

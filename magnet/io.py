"""Atomic output: nothing half-written is ever visible under its final name, and outputs are checked before work.

A temporary path is ``.{name}.magnet-tmp-{pid}-{host}-{token}.tmp`` beside the final ``name``: the writer's
process id and host are in the name, so the next writer of the same output (:func:`atomic_path`, or
:func:`remove_stale` for a whole folder) removes what a killed writer left (SIGKILL, power loss) and never
the temporary path of a writer that is still running (a live process, or one on another host).
"""

from __future__ import annotations

import contextlib
import hashlib
import glob
import os
import re
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Iterator

from magnet.errors import UserError

TMP_MARK = ".magnet-tmp-"
_TMP = re.compile(r"\.(?P<name>.+)\.magnet-tmp-(?P<pid>\d+)-(?P<host>.+)-[0-9a-f]{8}\.tmp")
_SIGNALS: list[int] = []  # termination signals received inside exit_on_sigterm


def _exit(signum, frame):
    _SIGNALS.append(signum)
    raise SystemExit(128 + signum)


def check_signals() -> None:
    """Raise again the SystemExit of a SIGTERM that Python dropped: an exception raised while a weakref callback or
    a finaliser runs is printed ("Exception ignored in") and the program goes on, so the handler's alone would let a
    terminated prediction finish and rename its output."""
    if _SIGNALS:
        raise SystemExit(128 + _SIGNALS[0])


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (a scheduler's kill) unwinds like an error, so with-blocks remove their temporary
    output, and the block ends with exit status 143; atomic_path renames nothing once it was received. Python's
    default would end the process on the spot. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    _SIGNALS.clear()
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
        yield
        check_signals()
    finally:
        signal.signal(signal.SIGTERM, previous)
        _SIGNALS.clear()


def tmp_name(final_name: str) -> str:
    """The temporary name of ``final_name`` for this process (unique: a random token)."""
    return f".{final_name}{TMP_MARK}{os.getpid()}-{socket.gethostname()}-{secrets.token_hex(4)}.tmp"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(folder: Path, name: str = "*") -> list[Path]:
    """Remove the temporary paths of ``name`` (default: any output) in ``folder`` whose writer is dead: written on
    this host by a process that no longer exists. Returns what was removed."""
    removed = []
    host = socket.gethostname()
    for p in Path(folder).glob(f".{'*' if name == '*' else glob.escape(name)}{TMP_MARK}*.tmp"):
        m = _TMP.fullmatch(p.name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    Works for files and directories (whatever the block creates at the temporary path). Temporary paths of
    ``final`` left by dead writers are removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final.parent, final.name)
    tmp_path = final.parent / tmp_name(final.name)
    try:
        yield tmp_path
        check_signals()
        if final.is_dir() and tmp_path.is_dir():
            shutil.rmtree(final)
        os.replace(tmp_path, final)
    finally:
        if tmp_path.is_dir():
            shutil.rmtree(tmp_path, ignore_errors=True)
        elif tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(final: str | Path, data: bytes) -> None:
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(final: str | Path, text: str) -> None:
    atomic_write_bytes(final, text.encode())


def _probe(folder: Path, path: Path, flag: str) -> None:
    """Create (and drop) a nameless file in ``folder``: the only check that root, read-only mounts and ACLs agree on."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise UserError(f"{path}: {flag}: cannot write in {folder} ({e.strerror})") from None


def check_writable(path: Path, flag: str) -> None:
    """Refuse a ``path`` that cannot be created: its nearest existing ancestor must be a writable directory."""
    parent = Path(path).absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{path}: {flag}: cannot create it ({parent} is a file, not a directory)")
    _probe(parent, path, flag)


def check_output(path: Path, flag: str, overwrite: bool, *, folder: bool = False) -> None:
    """Refuse, before any work, an output ``path`` that cannot be written: a folder where a file is expected (or
    a file where a folder is), a path under a file or an unwritable folder, or an existing one without
    ``overwrite`` (an empty folder is not an output yet)."""
    path = Path(path)
    if path.exists():
        if path.is_dir() != folder:
            raise UserError(f"{path}: {flag}: is a {'directory' if path.is_dir() else 'file'}; expected a "
                            f"{'folder' if folder else 'file'}")
        if not overwrite and not (folder and not any(path.iterdir())):
            raise UserError(f"{path}: {flag}: exists; pass --overwrite to replace it")
        if folder:
            _probe(path, path, flag)
    check_writable(path, flag)


def _inside(path: str, folder: str) -> bool:
    return path != folder and os.path.commonpath([path, folder]) == folder


def check_not_input(out: str | Path, flag: str, inputs: list[tuple[str, str | Path | None]]) -> None:
    """Refuse, before any work, an output ``out`` that would write over one of the command's ``inputs`` (pairs of
    the field that names it and its path; None: not given): ``out`` is that input, holds it (a folder written, or
    replaced, whole), or lies inside an input folder at a path that exists already (writing it would replace a
    part of the input). Symbolic links are followed and hard links compared by inode."""
    out = Path(out)
    mine = os.path.realpath(out)
    for field, given in inputs:
        if given is None or str(given) == "":
            continue
        theirs = os.path.realpath(given)
        same = mine == theirs or (out.exists() and Path(given).exists() and os.path.samefile(out, given))
        if same:
            why = "is"
        elif _inside(theirs, mine):
            why = "holds"
        elif _inside(mine, theirs) and out.exists():
            why = "lies inside, at an existing path,"
        else:
            continue
        raise UserError(f"{out}: {flag}: {why} the input {given} ({field}); an input is never an output: "
                        f"choose another {flag}")


def sha256_file(path: str | Path) -> str:
    """sha256 of the whole file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()

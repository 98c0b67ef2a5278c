"""DeepSpeed checkpoints from every rank: ``step%08d`` tags, an atomic ``latest`` pointer, keep the last k.

``engine.save_checkpoint`` runs on all ranks (it is a collective); rank 0 then writes the pointer
files with :func:`magnet.io.atomic_write_text` and prunes old tags, so a run killed mid-save resumes
from the previous complete checkpoint. The best checkpoint is a ``best-step%08d`` tag named by the
``best`` pointer.
"""

from __future__ import annotations

import pickle
import re
import shutil
from pathlib import Path

from magnet import dist
from magnet.errors import UserError
from magnet.io import atomic_write_text

STEP_TAG = re.compile(r"^step(\d{8})$")
BEST_TAG = re.compile(r"^best-step(\d{8})$")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def tag_step(tag: str) -> int:
    """The training step of a ``step_tag``."""
    m = STEP_TAG.match(tag)
    if m is None:
        raise ValueError(f"not a step tag: {tag!r}")
    return int(m.group(1))


def _write_failed(e: BaseException) -> bool:
    """An OSError (disk full, quota, file size limit), or torch's zip writer failing to write its file."""
    return isinstance(e, OSError) or (isinstance(e, RuntimeError) and "inline_container" in str(e))


def _save(engine, ckpt_dir: Path, tag: str, client_state: dict, pointer: str, keep: int, pattern) -> None:
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        if not _write_failed(e):
            raise
        free_kib = shutil.disk_usage(ckpt_dir).free // 1024
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)  # a partial tag; the pointer still names the last whole one
        kept = read_pointer(ckpt_dir, pointer)
        reason = getattr(e, "strerror", None) or f"a file was not written in full, {free_kib} KiB free on its disk"
        raise UserError(f"{ckpt_dir / tag}: train.out_dir: the checkpoint could not be written ({reason}); "
                        f"{'the checkpoint ' + kept + ' is kept' if kept else 'no checkpoint was kept'}") from None
    dist.barrier()
    if dist.is_primary():
        atomic_write_text(ckpt_dir / pointer, tag)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and pattern.match(p.name))
        for old in tags[:-keep]:
            shutil.rmtree(ckpt_dir / old)
    dist.barrier()


def save(engine, ckpt_dir: Path, step: int, client_state: dict, keep_last: int) -> str:
    tag = step_tag(step)
    _save(engine, ckpt_dir, tag, client_state, "latest", keep_last, STEP_TAG)
    return tag


def save_best(engine, ckpt_dir: Path, step: int, client_state: dict) -> str:
    tag = f"best-{step_tag(step)}"
    _save(engine, ckpt_dir, tag, client_state, "best", 1, BEST_TAG)
    return tag


def read_pointer(ckpt_dir: Path, pointer: str = "latest") -> str | None:
    p = ckpt_dir / pointer
    return p.read_text().strip() if p.is_file() else None


def _weights_only_load(path, map_location=None):
    """``torch.load(weights_only=True)``, allowing only the DeepSpeed classes its ZeRO 1/2/3 checkpoints
    pickle besides tensors and plain containers (DeepSpeed itself loads with ``weights_only=False``)."""
    # start-up time: the CLI imports this module
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Module, optimizer and scheduler state into ``engine`` (no arbitrary unpickling); returns the client state."""
    engine.checkpoint_engine.load = _weights_only_load
    try:
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{ckpt_dir / tag}: refused to load (not weights only): {first}") from None
    if path is None:
        raise UserError(f"{ckpt_dir / tag}: checkpoint could not be loaded")
    return client

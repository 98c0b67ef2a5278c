"""What a training run expects of a shard set's :class:`magnet.format.manifest.Manifest`, and the
cross-validation view of one."""

from __future__ import annotations

from magnet.errors import UserError
from magnet.format.manifest import Manifest


def check_manifest(man: Manifest, *, genes: list[str] | None, normalisation: dict | None) -> None:
    """Refuse a manifest this run cannot train on, naming the field that differs."""
    if genes is not None and list(man.genes) != list(genes):
        theirs, ours = list(man.genes), list(genes)
        diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise UserError(
            f"{man.path}: genes: {len(theirs)} genes differ from the {len(ours)} expected (data.genes / the checkpoint)"
            f", first difference at position {diff}: "
            f"{theirs[diff] if diff < len(theirs) else '<end>'!r} vs {ours[diff] if diff < len(ours) else '<end>'!r}"
        )
    if normalisation is not None and man.normalisation != normalisation:
        raise UserError(f"{man.path}: normalisation: is {man.normalisation!r}, expected {normalisation!r}")


def fold_roles(folds: dict[str, int], fold: int, held_out: str, train: str) -> dict[str, str]:
    """``slide -> role`` of a cross-validation run holding out ``fold``: ``held_out`` for that fold's
    slides, ``train`` for every other slide."""
    return {slide: held_out if f == fold else train for slide, f in folds.items()}


def fold_view(man: Manifest, fold: int, expected: dict | None, train_split: str, eval_split: str) -> Manifest:
    """The manifest as a cross-validation run holding out ``fold`` reads it (``data.fold``): every shard
    and slide of that fold is relabelled ``eval_split``, every other one ``train_split``; the split
    column is ignored. Shard-level, since each shard holds one slide and names it (``shards[].slide``).
    ``expected``: the ``slide -> fold`` map a run recorded (``data.folds``), which must still hold."""
    known = sorted(set(man.folds.values()))
    if fold not in known:
        raise UserError(f"{man.path}: data.fold: {fold} is not a fold of this manifest (its folds: {known})")
    if expected is not None and dict(expected) != dict(man.folds):
        raise UserError(f"{man.path}: folds: differ from data.folds (the folds recorded for this run)")
    return man.relabel(fold_roles(man.folds, fold, eval_split, train_split))



"""Seeded slide-level splits and folds; patient-level when the samplesheet has a patient column.

An explicit ``split`` / ``fold`` column is honoured; the other groups (a patient, or a slide
without patient) are shuffled with the seed and cut by ``val_frac`` / ``test_frac``, keeping at
least one training group. All slides of a patient land on the same side.
"""

from __future__ import annotations

import math

import numpy as np

from magnet.errors import UserError

from .config import SplitConfig
from .samplesheet import SlideEntry


def assign_splits(entries: list[SlideEntry], cfg: SplitConfig, seed: int, source: str) -> tuple[dict, dict]:
    """``(slide -> split, slide -> fold)``."""
    group_of = {e.slide: e.patient or f"slide:{e.slide}" for e in entries}
    groups = sorted(set(group_of.values()))
    explicit: dict[str, str] = {}
    for e in entries:
        if e.split is not None:
            prev = explicit.setdefault(group_of[e.slide], e.split)
            if prev != e.split:
                raise UserError(f"{source}: split: patient '{e.patient}' has slides in both {prev} and {e.split}")
    rng = np.random.default_rng(seed)
    free = [groups[i] for i in rng.permutation(len(groups)) if groups[i] not in explicit]
    n = len(free)
    n_test = math.floor(cfg.test_frac * n + 0.5)
    n_val = math.floor(cfg.val_frac * n + 0.5)
    while n_test + n_val > max(n - 1, 0) and n_test + n_val > 0:
        if n_test >= n_val:
            n_test -= 1
        else:
            n_val -= 1
    split_of = dict(explicit)
    for i, g in enumerate(free):
        split_of[g] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    if "train" not in split_of.values():
        raise UserError(f"{source}: split: no training slide (gene selection needs at least one)")
    fold_rank = {g: i % cfg.n_folds for i, g in enumerate(groups[j] for j in rng.permutation(len(groups)))}
    folds = {e.slide: e.fold if e.fold is not None else fold_rank[group_of[e.slide]] for e in entries}
    return {e.slide: split_of[group_of[e.slide]] for e in entries}, folds

"""The shard manifest (docs/shard_format.md) as training reads it, and the checks it must pass."""

from __future__ import annotations

import json
from pathlib import Path

from magnet.errors import UserError
from magnet.geometry import Geometry

from sharding.writer import FORMAT_VERSION  # the version the sharding stage writes


def manifest_path(shards: str | Path, bin_um: int) -> Path:
    return Path(shards) / f"{bin_um}um" / "manifest.json"


def load_manifest(shards: str | Path, bin_um: int) -> dict:
    path = manifest_path(shards, bin_um)
    if not path.is_file():
        raise UserError(f"{path}: manifest not found (key data.shards / data.bin_um; run `magnet shard` first)")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno})") from None
    for field in ("format_version", "genes", "normalisation", "geometry", "shards"):
        if field not in man:
            raise UserError(f"{path}: {field}: missing")
    return man


def check_manifest(man: dict, path: str | Path, *, genes: list[str] | None, normalisation: dict | None) -> None:
    """Refuse a manifest this run cannot train on, naming the field that differs."""
    if man["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: format_version: is {man['format_version']!r}, this reader expects {FORMAT_VERSION}")
    if genes is not None and list(man["genes"]) != list(genes):
        theirs, ours = list(man["genes"]), list(genes)
        diff = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
        raise UserError(
            f"{path}: genes: {len(theirs)} genes differ from the {len(ours)} expected (data.genes / the checkpoint)"
            f", first difference at position {diff}: "
            f"{theirs[diff] if diff < len(theirs) else '<end>'!r} vs {ours[diff] if diff < len(ours) else '<end>'!r}"
        )
    if normalisation is not None and man["normalisation"] != normalisation:
        raise UserError(f"{path}: normalisation: is {man['normalisation']!r}, expected {normalisation!r}")


def geometry_of(man: dict) -> Geometry:
    g = man["geometry"]
    return Geometry(mpp=g["mpp"], global_px=g["global_px"], spot_px=g["spot_px"], bin_px=g["bin_px"])


def split_shards(man: dict, root: Path, split: str) -> list[tuple[str, int]]:
    """``(path, n_samples)`` of the split's shards, in manifest order; a missing file is an error."""
    out = []
    for s in man["shards"]:
        if s["split"] != split:
            continue
        p = root / s["name"]
        if not p.is_file():
            raise UserError(f"{root / 'manifest.json'}: shards: {s['name']} is listed but missing")
        out.append((str(p), int(s["n_samples"])))
    if not out:
        raise UserError(f"{root / 'manifest.json'}: shards: no shard of split '{split}'")
    return out


def fold_roles(folds: dict[str, int], fold: int, held_out: str, train: str) -> dict[str, str]:
    """``slide -> role`` of a cross-validation run holding out ``fold``: ``held_out`` for that fold's
    slides, ``train`` for every other slide."""
    return {slide: held_out if f == fold else train for slide, f in folds.items()}


def fold_view(man: dict, path: str | Path, fold: int, expected: dict | None, train_split: str,
              eval_split: str) -> dict:
    """The manifest as a cross-validation run holding out ``fold`` reads it (``data.fold``): every shard
    and slide of that fold is relabelled ``eval_split``, every other one ``train_split``; the split
    column is ignored. Shard-level, since each shard holds one slide and names it (``shards[].slide``).
    ``expected``: the ``slide -> fold`` map a run recorded (``data.folds``), which must still hold."""
    folds = man["folds"]
    known = sorted(set(folds.values()))
    if fold not in known:
        raise UserError(f"{path}: data.fold: {fold} is not a fold of this manifest (its folds: {known})")
    if expected is not None and dict(expected) != dict(folds):
        raise UserError(f"{path}: folds: differ from data.folds (the folds recorded for this run)")
    role = fold_roles(folds, fold, eval_split, train_split)
    return {**man, "splits": role, "shards": [{**s, "split": role[s["slide"]]} for s in man["shards"]],
            "slides": {name: {**v, "split": role[name]} for name, v in man.get("slides", {}).items()}}


def feat_dim(man: dict) -> int:
    """Size of the frozen-encoder features stored with the spot and global tiles."""
    return int(man["encoder"]["feat_dim"])

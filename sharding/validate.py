"""``magnet shard validate SHARDS/16um``: re-read every shard and check it against the manifest.

Checks per shard: size and sha256, sample and bin counts; per sample: the members of the format,
array dtypes and shapes against the manifest (genes, neighbours, spot cells, feature size) and
``meta.json`` (slide and split: the shard entry's). Any mismatch is a UserError naming the shard and
the field.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zstandard

from magnet.errors import UserError

from .writer import FORMAT_VERSION, decode_npy, sha256_file

ARRAYS = {  # member -> (dtype, shape in terms of n, G, K1, S, F)
    "bin_xy": ("float32", ("n", 2)), "bin_rc": ("int32", ("n", 2)), "bin_spot": ("int16", ("n",)),
    "bin_expr": ("float16", ("n", "G")), "spot_expr": ("float16", ("K1", "S", "G")),
    "spot_mask": ("bool", ("K1", "S")), "spot_feat": ("float16", ("K1", "S", "F")),
    "global_expr": ("float16", ("K1", "G")), "global_feat": ("float16", ("K1", "F")),
    "nbr_offset": ("float32", ("K1", 2)), "nbr_mask": ("bool", ("K1",)),
}


def _read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    if not path.is_file():
        raise UserError(f"{path}: manifest missing (not a finished shard folder)")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: format_version: {manifest.get('format_version')} (this reader: {FORMAT_VERSION})")
    return manifest


def _samples(path: Path):
    """Yield (key, {member: bytes}) in tar order; member names are checked (magnet.data.corrupt.read_tar)."""
    from magnet.data.corrupt import read_tar

    for sample in read_tar(str(path), None):
        yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}


def _check_sample(where: str, members: dict, dims: dict, manifest: dict, shard: dict) -> int:
    image = [m for m in members if m.startswith("image.")]
    if len(image) != 1:
        raise UserError(f"{where}: image: expected one image member, found {image}")
    meta = json.loads(members["meta.json"])
    n = meta["n_bins"]
    for field, expect in (("slide", shard["slide"]), ("split", shard["split"]), ("bin_um", manifest["bin_um"]),
                          ("format_version", FORMAT_VERSION)):
        if meta.get(field) != expect:
            raise UserError(f"{where}: meta.json: {field} is {meta.get(field)!r}, manifest says {expect!r}")
    sizes = dict(dims, n=n)
    for name, (dtype, shape) in ARRAYS.items():
        member = f"{name}.npy.zst"
        if member not in members:
            raise UserError(f"{where}: {member}: missing")
        try:
            arr = decode_npy(members[member])
        except (ValueError, zstandard.ZstdError) as e:  # frame checksum, npy header
            raise UserError(f"{where}: {member}: cannot decode ({e})") from None
        want = tuple(sizes[d] if isinstance(d, str) else d for d in shape)
        if str(arr.dtype) != dtype or arr.shape != want:
            raise UserError(f"{where}: {member}: {arr.dtype} {arr.shape}, expected {dtype} {want}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{where}: {member}: non-finite values")
    return n


def dims_of(manifest: dict) -> dict[str, int]:
    """The sizes array shapes are checked against: genes, neighbours + 1, spot cells, feature size."""
    geom = manifest["geometry"]
    return {"G": len(manifest["genes"]), "K1": manifest["k_neighbours"] + 1,
            "S": geom["spots_per_side"] ** 2, "F": manifest["encoder"]["feat_dim"]}


def validate(folder: str | Path) -> dict:
    """Check every shard of a bin-size folder; return the summary of ``sharding.run.summary``."""
    from .run import summary

    folder = Path(folder)
    manifest = _read_manifest(folder)
    dims = dims_of(manifest)
    per_slide: dict[str, list[int]] = {}
    for shard in manifest["shards"]:
        path = folder / shard["name"]
        if not path.is_file():
            raise UserError(f"{path}: file missing (listed in manifest.json)")
        if path.stat().st_size != shard["bytes"]:
            raise UserError(f"{path}: bytes: {path.stat().st_size}, manifest says {shard['bytes']}")
        if sha256_file(path) != shard["sha256"]:
            raise UserError(f"{path}: sha256: does not match manifest.json")
        n_samples = n_bins = 0
        for key, members in _samples(path):
            n = _check_sample(f"{path}: {key}", members, dims, manifest, shard)
            slide = json.loads(members["meta.json"])["slide"]
            counts = per_slide.setdefault(slide, [0, 0])
            counts[0] += 1
            counts[1] += n
            n_samples, n_bins = n_samples + 1, n_bins + n
        for field, got in (("n_samples", n_samples), ("n_bins", n_bins)):
            if got != shard[field]:
                raise UserError(f"{path}: {field}: {got} in the shard, manifest says {shard[field]}")
    for slide, rec in manifest["slides"].items():
        got = per_slide.get(slide, [0, 0])
        if got != [rec["tiles"], rec["bins"]]:
            raise UserError(f"{folder / 'manifest.json'}: slides.{slide}: tiles/bins {rec['tiles']}/{rec['bins']}, "
                            f"shards hold {got[0]}/{got[1]}")
    return summary(manifest)


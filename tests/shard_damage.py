"""Damaged copies of shards for the fault tests: truncated, a flipped byte inside a member, a member
dropped, an unsafe member name, a link member; and a manifest made to agree with the damage."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from magnet.format.manifest import write_manifest
from magnet.format.tar import sha256_file


def _members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar]


def _rewrite(path: Path, members) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def corrupt(path: Path, kind: str) -> str:
    """Damage the shard at ``path``; returns the member affected (or '' for the whole file)."""
    if kind == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return ""
    members = _members(path)
    if kind in ("flip_npy", "flip_jpg"):
        suffix = ".bin_expr.npy.zst" if kind == "flip_npy" else ".image.jpg"
        info = next(i for i, _ in members if i.name.endswith(suffix))
        with tarfile.open(path) as tar:
            offset = tar.getmember(info.name).offset_data + info.size // 2
        raw = bytearray(path.read_bytes())
        raw[offset] ^= 0xFF
        path.write_bytes(bytes(raw))
        return info.name
    if kind == "drop":
        gone = next(i.name for i, _ in members if i.name.endswith(".spot_feat.npy.zst"))
        _rewrite(path, [(i, d) for i, d in members if i.name != gone])
        return gone
    if kind == "unsafe_name":
        info, data = members[0]
        info.name = "../" + info.name
        _rewrite(path, [(info, data), *members[1:]])
        return info.name
    if kind in ("symlink", "hardlink"):  # a link under a well-formed member name, pointing at a member
        target = members[0][0]
        key = target.name.split(".", 1)[0].rsplit("__", 1)[0] + "__99999_99999"
        link = tarfile.TarInfo(f"{key}.{target.name.split('.', 1)[1]}")
        link.type, link.linkname = (tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE), target.name
        _rewrite(path, [*members, (link, b"")])
        return link.name
    raise ValueError(kind)


def rehash(folder: Path, name: str) -> None:
    """Make the manifest agree with a damaged shard (as if it had been written that way)."""
    man_path = folder / "manifest.json"
    man = json.loads(man_path.read_text())
    entry = next(s for s in man["shards"] if s["name"] == name)
    entry.update(bytes=(folder / name).stat().st_size, sha256=sha256_file(folder / name))
    write_manifest(man_path, man)


def nan_features(path: Path) -> int:
    """Set the frozen features (``spot_feat``, ``global_feat``) of every sample in the shard to NaN, the
    members still well-formed; returns the members changed (then :func:`rehash` the manifest)."""
    from magnet.format.codec import decode_npy, encode_npy

    members, changed = _members(path), 0
    for i, (info, data) in enumerate(members):
        if info.name.endswith((".spot_feat.npy.zst", ".global_feat.npy.zst")):
            arr = decode_npy(data)
            arr[...] = float("nan")
            members[i] = (info, encode_npy(arr))
            changed += 1
    _rewrite(path, members)
    return changed


def bomb(path: Path, declared: int) -> str:
    """Replace the shard's first ``bin_expr`` member by a zstd frame of a few KB that declares and expands
    to ``declared`` bytes (a valid npy of that many float16 zeros); returns the member's name."""
    import numpy as np
    import zstandard

    members = _members(path)
    info = next(i for i, _ in members if i.name.endswith(".bin_expr.npy.zst"))
    n_genes = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(dict(
        (i.name, d) for i, d in members)[info.name])), allow_pickle=False).shape[1]
    header = io.BytesIO()
    shape = (declared // (2 * n_genes), n_genes)
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": shape})
    body = shape[0] * n_genes * 2
    comp = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj(size=len(header.getvalue()) + body)
    chunk = bytes(1 << 24)
    parts = [comp.compress(header.getvalue())]
    for start in range(0, body, len(chunk)):
        parts.append(comp.compress(chunk[: min(len(chunk), body - start)]))
    parts.append(comp.flush())
    _rewrite(path, [(i, b"".join(parts) if i.name == info.name else d) for i, d in members])
    return info.name

"""A slide's identity by content, not by name: ``magnet shard`` records it per slide and bin size in the
manifest (``slides.{slide}.fingerprint``), and ``magnet evaluate`` refuses to score a slide whose image
or count matrix has a training slide's fingerprint, whatever the slide is called."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .binned_outputs import BinFiles

BLOCK, BLOCKS = 1 << 20, 64


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file's size and its bytes: all of them up to 64 MiB, else 64 evenly spaced 1 MiB
    blocks (a full-resolution image is GBs, often on network storage; a copy still matches, another slide does not)."""
    size = os.path.getsize(path)
    sha = hashlib.sha256(f"{size}:".encode())
    spans = [(0, size)] if size <= BLOCK * BLOCKS else [(i * (size - BLOCK) // (BLOCKS - 1), BLOCK)
                                                        for i in range(BLOCKS)]
    with open(path, "rb") as fh:
        for offset, n in spans:
            fh.seek(offset)
            sha.update(fh.read(n))
    return sha.hexdigest()


def slide_fingerprints(image: str | Path, spaceranger: str | Path, bin_ums: list[int]) -> dict[int, dict[str, str]]:
    """``{bin_um: {"image": ..., "matrix": ...}}``: the H&E image file (hashed once) and each bin size's filtered
    count matrix."""
    image_fp = file_fingerprint(image)
    return {b: {"image": image_fp, "matrix": file_fingerprint(BinFiles.of(Path(spaceranger), b).matrix)}
            for b in bin_ums}

"""Sample encoding and deterministic tar shards (docs/shard_format.md, format version 1).

Tar members have fixed metadata (mtime 0, uid/gid 0, no user names, mode 0644) and sorted order,
arrays are ``.npy`` without pickle compressed with zstd at a fixed level, images are encoded with
fixed settings: the same inputs, config and seed give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

FORMAT_VERSION = 2  # 2: spot/global features centred on the slide (sharding/features.py)
ZSTD_LEVEL = 3


def encode_npy(arr: np.ndarray) -> bytes:
    import zstandard

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(buf.getvalue())


def decode_npy(data: bytes) -> np.ndarray:
    import zstandard

    return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)


def encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="WEBP", lossless=True, quality=80, method=4)
    return buf.getvalue()


class EncodedTiles:
    """Global tile images read once: :meth:`read` takes a block of tiles ``(gx, gy)`` from the slide image
    (with margin, at the model pixel size) and appends each, encoded as in the shards, to an unlinked
    temporary file in ``folder``; :meth:`encoded` gives the ``i``-th tile's bytes back. Memory holds one
    block of decoded tiles. Used by the sharding stage and by ``magnet predict`` (features first, samples
    after)."""

    def __init__(self, image, geom, mpp_full: float, fmt: str, quality: int, folder: Path | None = None):
        import tempfile

        self.image, self.geom, self.mpp_full, self.fmt, self.quality = image, geom, mpp_full, fmt, quality
        self.spill = tempfile.TemporaryFile(prefix="magnet-tiles-", dir=folder)
        self.spans: list[tuple[int, int]] = []

    def __enter__(self) -> "EncodedTiles":
        return self

    def __exit__(self, *exc) -> None:
        self.spill.close()

    def read(self, block) -> list[np.ndarray]:
        """Decoded images of the tiles ``(gx, gy)`` in ``block``, in order; their encoded bytes are kept."""
        g = self.geom
        imgs = [self.image.region(*g.tile_origin_px(int(gx), int(gy)), g.image_px, g.mpp, self.mpp_full)
                for gx, gy in block]
        self.spill.seek(0, 2)
        for img in imgs:
            data = encode_image(img, self.fmt, self.quality)
            self.spans.append((self.spill.tell(), len(data)))
            self.spill.write(data)
        return imgs

    def encoded(self, i: int) -> bytes:
        start, size = self.spans[i]
        self.spill.seek(start)
        return self.spill.read(size)


def sample_key(slide: str, gx: int, gy: int) -> str:
    return f"{slide}__{gx:05d}_{gy:05d}"


def encode_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True).encode()


class _HashingFile:
    """A write-only file that counts and hashes what passes through."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


class PartWriter:
    """Writes samples into ``folder/part-NNNNNN.tar``, closing a part at a sample or byte limit.

    ``folder`` is a slide's temporary work folder, renamed into place only when the slide is done.
    """

    def __init__(self, folder: Path, max_samples: int, max_bytes: int):
        self.folder, self.max_samples, self.max_bytes = Path(folder), max_samples, max_bytes
        self.parts: list[dict] = []
        self._open = None

    def _start(self) -> None:
        name = f"part-{len(self.parts):06d}.tar"
        fh = open(self.folder / name, "wb")
        hf = _HashingFile(fh)
        tar = tarfile.open(fileobj=hf, mode="w|", format=tarfile.PAX_FORMAT)
        self._open = {"fh": fh, "hf": hf, "tar": tar, "name": name, "n_samples": 0, "n_bins": 0}

    def write(self, key: str, members: dict[str, bytes], n_bins: int) -> None:
        if self._open is None:
            self._start()
        part = self._open
        for ext in sorted(members):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(members[ext]), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            part["tar"].addfile(info, io.BytesIO(members[ext]))
        part["n_samples"] += 1
        part["n_bins"] += n_bins
        if part["n_samples"] >= self.max_samples or part["hf"].size >= self.max_bytes:
            self._close()

    def _close(self) -> None:
        part, self._open = self._open, None
        part["tar"].close()
        part["fh"].close()
        self.parts.append({"part": part["name"], "n_samples": part["n_samples"], "n_bins": part["n_bins"],
                           "bytes": part["hf"].size, "sha256": part["hf"].sha.hexdigest()})

    def close(self) -> list[dict]:
        if self._open is not None:
            self._close()
        return self.parts


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()

"""Corrupted shards met while streaming, handled by ``data.on_corrupt`` (``fail`` or ``skip``).

Three checks, so nothing corrupted is ever trained on silently:

* a shard is verified against the manifest's ``bytes`` and ``sha256`` when a loader process first
  opens it (a truncated shard, or a flipped byte anywhere, even in a JPEG that would still decode);
* every tar member must be a regular file named ``{slide}__{gx}_{gy}.{member}`` with a member of
  the format (no absolute paths, no ``..``, nothing unexpected), read with the tar headers checked;
* every sample must decode (zstd frames carry checksums, ``np.load(allow_pickle=False)``) to the
  members, dtypes and shapes of docs/shard_format.md.

``fail`` raises a one-line UserError naming the shard and member. ``skip`` drops the sample (a
shard that fails its checksum: all of its samples), prints a warning and counts the samples in
:attr:`Corruption.pending`; the collate stage hands the count to the training loop with each batch
(``Batch.corrupt_samples``), which logs the running total as ``data/corrupt_samples``.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
from collections.abc import Iterator

import numpy as np

from magnet.errors import UserError
from sharding.validate import ARRAYS
from sharding.writer import sha256_file

POLICIES = ("fail", "skip")
KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*__\d{5,}_\d{5,}$")  # samplesheet slide names, then the tile
MEMBERS = re.compile(r"^(image\.(jpg|png|webp)|meta\.json|[a-z_]+\.npy\.zst)$")
OPTIONAL = {"bin_counts"}


class Corruption:
    """The policy, the manifest's ``path -> (bytes, sha256, n_samples)`` and the count of skipped samples."""

    def __init__(self, policy: str, expected: dict[str, tuple[int, str, int]], dims: dict[str, int] | None):
        if policy not in POLICIES:
            raise UserError(f"config: data.on_corrupt: '{policy}' is not one of {', '.join(POLICIES)}")
        self.policy, self.expected, self.dims = policy, expected, dims
        self.pending = 0
        self._verified: dict[tuple, bool] = {}

    def handle(self, message: str, n_samples: int = 1) -> None:
        """Raise (``fail``) or warn and count ``n_samples`` skipped samples (``skip``)."""
        if self.policy == "fail":
            raise UserError(f"{message} (data.on_corrupt=fail; `magnet shard validate` checks a shard folder)")
        print(f"magnet: warning: {message}; skipped {n_samples} sample(s) (data.on_corrupt=skip)", file=sys.stderr,
              flush=True)
        self.pending += n_samples

    def take(self) -> int:
        n, self.pending = self.pending, 0
        return n

    def shard_ok(self, url: str) -> bool:
        """Size and sha256 of a manifest shard (once per loader process and file version)."""
        if url not in self.expected:
            return True
        size, sha, n = self.expected[url]
        st = os.stat(url)
        key = (url, st.st_size, st.st_mtime_ns)
        if key not in self._verified:
            self._verified[key] = st.st_size == size and sha256_file(url) == sha
        if not self._verified[key]:
            why = f"bytes: {st.st_size}, manifest says {size}" if st.st_size != size else "sha256: does not match manifest.json"
            self.handle(f"{url}: {why}", n)
        return self._verified[key]


def read_tar(url: str, corruption: Corruption | None) -> Iterator[dict]:
    """Samples of one shard as webdataset dicts (``__key__``, ``__url__``, member -> bytes), in tar order."""
    sample: dict = {}
    try:
        with tarfile.open(url, mode="r|") as tar:
            for info in tar:
                key, _, member = info.name.partition(".")
                if not (info.isreg() and KEY.match(key) and MEMBERS.match(member)):
                    raise _BadMember(f"{url}: {info.name!r}: unexpected tar member (expected a file "
                                     f"'{{slide}}__{{gx}}_{{gy}}.{{member}}' of docs/shard_format.md)")
                if sample and key != sample["__key__"]:
                    yield sample
                    sample = {}
                if member in sample:
                    raise _BadMember(f"{url}: {info.name}: member repeated")
                sample.setdefault("__key__", key)
                sample["__url__"] = url
                sample[member] = tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, OSError, _BadMember) as e:
        message = str(e) if isinstance(e, _BadMember) else f"{url}: after {sample.get('__key__', 'the start')}: " \
                                                           f"unreadable tar ({type(e).__name__}: {e})"
        if corruption is None:
            raise UserError(message) from None
        corruption.handle(message)  # the rest of the shard cannot be trusted: stop reading it
        return
    if sample:
        yield sample


class _BadMember(Exception):
    pass


def check_sample(sample: dict, dims: dict[str, int], url: str) -> None:
    """Members, dtypes and shapes of a decoded sample against the manifest's dimensions (``G``, ``K1``, ``S``, ``F``)."""
    where = f"{url}: {sample['key']}"
    sizes = dict(dims, n=int(sample["meta"].get("n_bins", -1)))
    for name, (dtype, shape) in ARRAYS.items():
        if name not in sample:
            raise UserError(f"{where}.{name}.npy.zst: missing")
        arr: np.ndarray = sample[name]
        want = tuple(sizes[d] if isinstance(d, str) else d for d in shape)
        if str(arr.dtype) != dtype or arr.shape != want:
            raise UserError(f"{where}.{name}.npy.zst: {arr.dtype} {arr.shape}, expected {dtype} {want}")
    for name in OPTIONAL & sample.keys():
        if sample[name].shape[0] != sizes["n"]:
            raise UserError(f"{where}.{name}.npy.zst: {sample[name].shape[0]} rows, expected {sizes['n']}")

"""Corrupted shards met while streaming, handled by ``data.on_corrupt`` (``fail`` or ``skip``).

Three checks, so nothing corrupted is ever trained on silently:

* a shard is verified against the manifest's ``bytes`` and ``sha256`` when a loader process first
  opens it (a truncated shard, or a flipped byte anywhere, even in a JPEG that would still decode);
* every tar member must be named ``{slide}__{gx}_{gy}.{member}`` with a member of the format
  (:class:`magnet.format.tar.TarSamples`, whose webdataset handler is :meth:`Corruption.handle`);
* every sample must decode (zstd frames carry checksums, ``np.load(allow_pickle=False)``) and pass
  the schema check (:func:`magnet.format.validate.check_sample`) with the manifest's sizes.

``fail`` raises a one-line UserError naming the shard and member. ``skip`` drops the sample (a
shard that fails its checksum: all of its samples), prints a warning and counts the samples in
:attr:`Corruption.pending`; the collate stage hands the count to the training loop with each batch
(``Batch.corrupt_samples``), which logs the running total as ``data/corrupt_samples``.
"""

from __future__ import annotations

import os
import sys

from magnet.errors import UserError
from magnet.format.tar import sha256_file
from magnet.format.validate import Dims

POLICIES = ("fail", "skip")


class Corruption:
    """The policy, the manifest's ``path -> (bytes, sha256, n_samples)``, the sizes samples are checked
    against and the count of skipped samples."""

    def __init__(self, policy: str, expected: dict[str, tuple[int, str, int]], dims: Dims):
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

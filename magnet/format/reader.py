"""The one checked reader of a manifest's shards. Every path that reads shards goes through it: the
training and evaluation streams, the training statistics (``model.init_from_data``), the registered
model's example, ``magnet shard validate`` and the benches; so ``data.on_corrupt`` means the same
everywhere. Three checks, so nothing corrupted is ever read silently:

* a shard is verified against the manifest's ``bytes`` and ``sha256`` when a process first opens it
  (a truncated shard, or a flipped byte anywhere, even in a JPEG that would still decode);
* every tar member must be named ``{slide}__{gx}_{gy}.{member}`` with a member of the format
  (:class:`magnet.format.tar.TarSamples`, whose webdataset handler is :meth:`ShardReader.handle`);
* every sample must decode (zstd frames carry checksums, ``np.load(allow_pickle=False)``), each member
  bounded by the size the schema and the manifest give it (a decompression bomb is refused before it
  takes memory), pass the schema check (:func:`magnet.format.check.check_sample`) with the manifest's sizes,
  and name its shard entry's slide and the manifest's bin size in ``meta.json`` (:meth:`ShardReader.check_meta`).

``fail`` raises a one-line UserError naming the shard and member. ``skip`` drops the sample (a shard
that fails its checksum: all of its samples), prints a warning and counts the samples in
:attr:`ShardReader.pending`; the data pipeline's collate stage hands the count to the training loop
with each batch (``Batch.corrupt_samples``), which logs the running total as ``data/corrupt_samples``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator

from magnet.errors import UserError
from magnet.format.codec import decode_sample
from magnet.format.manifest import Manifest
from magnet.format.sample import Sample
from magnet.format.tar import TarSamples, sha256_file
from magnet.format.check import check_sample

POLICIES = ("fail", "skip")


class ShardReader:
    """Samples of ``manifest``'s shards under ``policy``. ``setting``: the config key named in messages
    (None: a command that always fails, ``magnet shard validate``); ``finite``: also check that float
    members are finite (the writer checked them; the loader trusts the sha256)."""

    def __init__(self, manifest: Manifest, policy: str = "fail", setting: str | None = "data.on_corrupt",
                 finite: bool = False, skip: tuple[str, ...] = ()):
        if policy not in POLICIES:
            raise UserError(f"config: {setting}: '{policy}' is not one of {', '.join(POLICIES)}")
        self.policy, self.setting, self.finite, self.dims = policy, setting, finite, manifest.dims
        self.expected = {str(manifest.root / s.name): (s.bytes, s.sha256, s.n_samples) for s in manifest.shards}
        self.slide_of = {str(manifest.root / s.name): s.slide for s in manifest.shards}
        self.bin_um = manifest.bin_um
        self.max_bins = {str(manifest.root / s.name): s.n_bins for s in manifest.shards}
        self.skip = skip  # members left encoded and dropped before decoding (``image`` for model.bin_input=features)
        self.pending = 0
        self._verified: dict[tuple, bool] = {}

    def handle(self, message: str, n_samples: int = 1) -> None:
        """Raise (``fail``) or warn and count ``n_samples`` skipped samples (``skip``)."""
        if self.policy == "fail":
            if self.setting is None:
                raise UserError(message)
            raise UserError(f"{message} ({self.setting}=fail; `magnet shard validate` checks a shard folder)")
        print(f"magnet: warning: {message}; skipped {n_samples} sample(s) ({self.setting}=skip)", file=sys.stderr,
              flush=True)
        self.pending += n_samples

    def take(self) -> int:
        """Samples skipped since the last call."""
        n, self.pending = self.pending, 0
        return n

    def shard_ok(self, url: str) -> bool:
        """Size and sha256 of a manifest shard (once per process and file version); a file not in the
        manifest is not read."""
        if url not in self.expected:
            raise UserError(f"{url}: not a shard of the manifest it is read with")
        size, sha, n = self.expected[url]
        if not os.path.isfile(url):
            self.handle(f"{url}: file missing (listed in manifest.json)", n)
            return False
        st = os.stat(url)
        key = (url, st.st_size, st.st_mtime_ns)
        if key not in self._verified:
            self._verified[key] = st.st_size == size and sha256_file(url) == sha
        if not self._verified[key]:
            why = (f"bytes: {st.st_size}, manifest says {size}" if st.st_size != size
                   else "sha256: does not match manifest.json")
            self.handle(f"{url}: {why}", n)
        return self._verified[key]

    def raw(self, src: Iterator[dict]) -> Iterator[dict]:
        """Stage: shard dicts (``url``) -> samples as member bytes, each shard checked first (own stage:
        webdataset verifies no checksums). A run of more corrupt shards than the manifest lists means a
        repeating stream has none left to read."""
        def checked(shards: Iterator[dict]) -> Iterator[dict]:
            bad_in_a_row = 0
            for shard in shards:
                if not self.shard_ok(shard["url"]):
                    bad_in_a_row += 1
                    if bad_in_a_row > len(self.expected):
                        raise UserError(f"{shard['url']}: every shard this loader reads is corrupt ({self.setting})")
                    continue
                bad_in_a_row = 0
                yield shard

        return TarSamples(self.handle)(checked(src))

    def decode(self, src: Iterator[dict]) -> Iterator[Sample]:
        """Stage: member bytes -> :class:`Sample`, checked against the schema with the manifest's sizes."""
        for raw in src:
            if self.skip:
                raw = {k: v for k, v in raw.items() if k.partition(".")[0] not in self.skip}
            try:
                sample = decode_sample(raw, self.dims, self.max_bins.get(raw.get("__url__")))
                where = f"{sample.url}: {raw['__key__']}"
                check_sample(sample, self.dims, where, stored=True, finite=self.finite,
                             image="image" not in self.skip)
                self.check_meta(sample, where)
            except UserError as e:
                self.handle(str(e))
                continue
            yield sample

    def check_meta(self, sample: Sample, where: str) -> None:
        """The sample's ``meta.json`` agrees with the manifest: the slide of its shard entry and the bin size
        (a shard of another bin size has the same array sizes, so the schema check passes it)."""
        for field, got, expect in (("slide", sample.meta.slide, self.slide_of.get(sample.url, sample.meta.slide)),
                                   ("bin_um", sample.meta.bin_um, self.bin_um)):
            if got != expect:
                raise UserError(f"{where}: meta.json: {field} is {got!r}, manifest says {expect!r}")

    def read(self, urls: Iterable[str]) -> Iterator[Sample]:
        """The checked samples of ``urls`` (manifest shards), in order."""
        return self.decode(self.raw({"url": u} for u in urls))

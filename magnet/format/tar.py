"""Tar shards through webdataset: :class:`PartWriter` writes with ``webdataset.TarWriter`` (fixed
metadata: mtime 0, uid/gid 0, no user names, mode 0644; members sorted), so the same samples give
byte-identical shards; :class:`TarSamples` reads with webdataset's ``url_opener`` and ``group_by_keys``,
checking every member (a plain file, named as the schema says) before it is read.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import webdataset as wds

from magnet.errors import UserError
from magnet.io import sha256_file  # noqa: F401  (re-exported: the shard checksums)
from magnet.format.codec import encode_sample
from magnet.format.sample import Sample
from magnet.format.schema import KEY, member_of
from magnet.format.check import Dims, check_sample


class _HashingFile:
    """A write-only file that counts and hashes what passes through."""

    def __init__(self, fh):
        self.fh, self.sha, self.size = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.fh.write(data)


class PartWriter:
    """Checks each sample against the schema and writes it into ``folder/part-NNNNNN.tar``, closing a part
    at a sample or byte limit. Own part rollover, not ``webdataset.ShardWriter``: the byte limit counts
    tar headers and the sha256 is taken while writing, which ShardWriter does not give."""

    def __init__(self, folder: Path, max_samples: int, max_bytes: int, dims: Dims, image_format: str):
        self.folder, self.max_samples, self.max_bytes = Path(folder), max_samples, max_bytes
        self.dims, self.image_format = dims, image_format
        self.parts: list[dict] = []
        self._open = None

    def _start(self) -> None:
        name = f"part-{len(self.parts):06d}.tar"
        fh = open(self.folder / name, "wb")
        hf = _HashingFile(fh)
        tar = wds.TarWriter(hf, user="", group="", mode=0o644, mtime=0, encoder=False, compress=False)
        self._open = {"fh": fh, "hf": hf, "tar": tar, "name": name, "n_samples": 0, "n_bins": 0}

    def write(self, sample: Sample, image: bytes) -> None:
        """``image``: the tile image, encoded as ``image_format``."""
        check_sample(sample, self.dims, f"{self.folder.name}: {sample.key}", stored=True, image=False)
        if self._open is None:
            self._start()
        part = self._open
        part["tar"].write(encode_sample(sample, image, self.image_format))
        part["n_samples"] += 1
        part["n_bins"] += sample.n_bins
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


class BadMember(Exception):
    def __init__(self, name: str, why: str = "unexpected tar member"):
        super().__init__(name)
        self.name, self.why = name, why


def _check_name(name: str) -> bool:
    key, _, suffix = name.partition(".")
    if not (KEY.match(key) and member_of(suffix) is not None):
        raise BadMember(name)
    return True


def _check_member(info: tarfile.TarInfo) -> None:
    if info.issym() or info.islnk():
        raise BadMember(info.name, f"a {'symbolic' if info.issym() else 'hard'} link (to {info.linkname!r}); "
                                   f"links are refused")
    if not info.isreg():
        raise BadMember(info.name, "not a plain file")
    _check_name(info.name)


def _first(exn: Exception) -> str:
    """The message webdataset's stages extend with extra arguments."""
    return str(exn.args[0]) if exn.args else type(exn).__name__


class TarSamples:
    """Stage: shard dicts (``url``) -> samples (``__key__``, ``__url__``, member suffix -> bytes), in tar
    order, through webdataset's ``url_opener`` and ``group_by_keys``. Every member must be a plain file named
    ``{slide}__{gx}_{gy}.{member of the schema}`` (no paths, no links, nothing else). A failure goes to
    ``on_error(message)`` (it raises, or counts and returns); without one it is a UserError. An unexpected
    member ends its shard (what follows is not trusted), a tar that cannot be read ends at the damage, a
    repeated member is dropped."""

    def __init__(self, on_error: Callable[[str], None] | None = None):
        self.on_error = on_error
        self.url = "?"

    def _handle(self, exn: Exception) -> bool:
        if isinstance(exn, BadMember):
            message = (f"{self.url}: {exn.name!r}: {exn.why} (expected a file "
                       f"'{{slide}}__{{gx}}_{{gy}}.{{member}}' of docs/shard_format.md)")
        elif isinstance(exn, ValueError) and "duplicate file name" in _first(exn):
            message = f"{self.url}: {_first(exn).split(':')[0]}: member repeated"
        else:
            message = f"{self.url}: unreadable tar ({type(exn).__name__}: {_first(exn).split(' @ ')[0]})"
        if self.on_error is None:
            raise UserError(message) from None
        self.on_error(message)
        return not isinstance(exn, BadMember)  # False ends the shard being read

    def _members(self, src: Iterator[dict]) -> Iterator[dict]:
        """Own stage for webdataset's ``tar_file_expander``, which passes over links and other non-file members
        without a word: here every member is checked (:func:`_check_member`) before it is read."""
        for source in src:
            self.url = source["url"]
            try:
                tar = tarfile.open(fileobj=source["stream"], mode="r|*")
                for info in tar:
                    try:
                        _check_member(info)
                        yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": self.url}
                        tar.members = []  # a stream: keep no headers
                    except Exception as exn:  # each failure goes to the handler, as in webdataset
                        if not self._handle(exn):
                            break
                yield {}  # end of shard: group_by_keys never joins two shards' members
            except Exception as exn:  # an unreadable tar
                if not self._handle(exn):
                    break
            finally:
                source["stream"].close()

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        opened = wds.tariterators.url_opener(src, handler=self._handle)
        return wds.tariterators.group_by_keys(self._members(opened), handler=self._handle)

"""The manifest of one bin size's shard folder (``SHARDS/{bin}um/manifest.json``) as a typed record.

:meth:`Manifest.load` is the one reader; it refuses a folder of another format version, or a manifest
whose content no longer matches its ``checksum`` (edited after it was written), in one line.
:func:`write_manifest` is the one writer; it records that checksum.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from magnet.errors import UserError
from magnet.format.schema import FORMAT_VERSION
from magnet.format.check import Dims
from magnet.geometry import Geometry
from magnet.io import atomic_write_text

CHECKSUM = "checksum"  # sha256 of the canonical JSON of every other field (:func:`content_sha256`)
REQUIRED = ("format_version", "bin_um", "genes", "normalisation", "geometry", "k_neighbours", "encoder", "shards")


def manifest_path(shards: str | Path, bin_um: int) -> Path:
    return Path(shards) / f"{bin_um}um" / "manifest.json"


def content_sha256(doc: dict[str, Any]) -> str:
    """sha256 of the manifest's content without its checksum, as canonical JSON (sorted keys, compact);
    taken on the JSON round trip, so the written and the read document give the same text."""
    content = json.loads(json.dumps({k: v for k, v in doc.items() if k != CHECKSUM}))
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(path: str | Path, doc: dict[str, Any]) -> Path:
    """Write ``doc`` to ``path`` atomically with its ``checksum``: the one way a manifest is written."""
    path = Path(path)
    atomic_write_text(path, json.dumps({**doc, CHECKSUM: content_sha256(doc)}, indent=1, sort_keys=True) + "\n")
    return path


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One tar shard: it holds samples of one slide."""

    name: str
    split: str
    slide: str
    n_samples: int
    n_bins: int
    bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    format_version: int
    bin_um: int
    genes: tuple[str, ...]
    normalisation: dict[str, Any]
    geometry: Geometry
    k_neighbours: int
    encoder: dict[str, Any]  # name, feat_dim, weights, input_px
    shards: tuple[ShardEntry, ...]
    splits: dict[str, str] = dataclasses.field(default_factory=dict)  # slide -> split
    slides: dict[str, dict] = dataclasses.field(default_factory=dict)  # slide -> tiles, bins, split, fold, ...
    folds: dict[str, int] = dataclasses.field(default_factory=dict)  # slide -> fold
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # gene_ids, plan, config, ... (recorded as is)
    path: Path | None = None  # where it was read from (messages)

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Manifest:
        where = path or "manifest.json"
        for field in REQUIRED:
            if field not in d:
                raise UserError(f"{where}: {field}: missing")
        g = d["geometry"]
        try:
            geometry = Geometry(mpp=g["mpp"], global_px=g["global_px"], spot_px=g["spot_px"], bin_px=g["bin_px"])
            shards = tuple(ShardEntry(**s) for s in d["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where}: {'geometry' if isinstance(e, KeyError) else 'shards'}: malformed ({e})") from None
        own = {f.name for f in dataclasses.fields(cls)}
        return cls(format_version=d["format_version"], bin_um=d["bin_um"], genes=tuple(d["genes"]),
                   normalisation=d["normalisation"], geometry=geometry, k_neighbours=int(d["k_neighbours"]),
                   encoder=d["encoder"], shards=shards, splits=d.get("splits", {}), slides=d.get("slides", {}),
                   folds=d.get("folds", {}), path=path,
                   extra={k: v for k, v in d.items() if k not in own and k != CHECKSUM})

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        """Read ``path``; a missing file, bad JSON, another format version, a checksum that does not match the
        content or a missing field is a UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: manifest not found (key data.shards / data.bin_um; run `magnet shard` first)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not valid JSON (not UTF-8 text)") from None
        if not isinstance(d, dict):
            raise UserError(f"{path}: not a manifest (a JSON {type(d).__name__}, expected an object)")
        if d.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{path}: format_version: shards of format {d.get('format_version')!r}, this version "
                            f"reads format {FORMAT_VERSION}; re-run `magnet shard`")
        if d.get(CHECKSUM) != content_sha256(d):
            raise UserError(f"{path}: {CHECKSUM}: the manifest was edited after `magnet shard` wrote it (content "
                            f"sha256 {content_sha256(d)[:12]}, recorded {str(d.get(CHECKSUM))[:12]}); "
                            f"re-run `magnet shard` into a new --out")
        return cls.from_dict(d, path)

    def to_dict(self) -> dict[str, Any]:
        return {**self.extra, "format_version": self.format_version, "bin_um": self.bin_um, "genes": list(self.genes),
                "normalisation": self.normalisation, "geometry": self.geometry.to_dict(),
                "k_neighbours": self.k_neighbours, "encoder": self.encoder,
                "shards": [dataclasses.asdict(s) for s in self.shards], "splits": self.splits,
                "slides": self.slides, "folds": self.folds}

    @property
    def feat_dim(self) -> int:
        """Size of the frozen-encoder features stored with the spot and global tiles."""
        return int(self.encoder["feat_dim"])

    @property
    def dims(self) -> Dims:
        """The sizes every sample's arrays are checked against."""
        return Dims(G=len(self.genes), K1=self.k_neighbours + 1, S=self.geometry.n_spots, F=self.feat_dim,
                    P=self.geometry.image_px, L=len(self.encoder.get("field_sd_um", ())))

    @property
    def root(self) -> Path:
        assert self.path is not None, "a manifest not read from a folder"
        return self.path.parent

    def shard_files(self, split: str) -> list[tuple[str, int]]:
        """``(path, n_samples)`` of the split's shards, in manifest order; a missing file is an error."""
        out = []
        for s in self.shards:
            if s.split != split:
                continue
            p = self.root / s.name
            if not p.is_file():
                raise UserError(f"{self.path}: shards: {s.name} is listed but missing")
            out.append((str(p), s.n_samples))
        if not out:
            raise UserError(f"{self.path}: shards: no shard of split '{split}'")
        return out

    def has_split(self, split: str) -> bool:
        return any(s.split == split for s in self.shards)

    def relabel(self, role: dict[str, str]) -> Manifest:
        """Every shard and slide relabelled ``role[slide]`` (a cross-validation view)."""
        return dataclasses.replace(self, splits=dict(role),
                                   shards=tuple(dataclasses.replace(s, split=role[s.slide]) for s in self.shards),
                                   slides={k: {**v, "split": role[k]} for k, v in self.slides.items()})

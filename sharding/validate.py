"""``magnet shard validate SHARDS/16um``: re-read every shard and check it against the manifest.

The manifest's checksum (:meth:`magnet.format.manifest.Manifest.load`); every shard read through the one
checked reader (:mod:`magnet.format.reader`: size and sha256, member names, the schema check with the
manifest's sizes and finite values; ``meta.json``'s slide and bin size), failing at the first damage; sample and
bin counts; per sample ``meta.json``'s split (the shard entry's). Any mismatch is a
UserError naming the shard and the field.
"""

from __future__ import annotations

from pathlib import Path

from magnet.errors import UserError
from magnet.format.manifest import Manifest
from magnet.format.reader import ShardReader

from .run import summary


def validate(folder: str | Path) -> dict:
    """Check every shard of a bin-size folder; return the summary of ``sharding.run.summary``."""
    folder = Path(folder)
    manifest = Manifest.load(folder / "manifest.json")
    reader = ShardReader(manifest, "fail", setting=None, finite=True)
    per_slide: dict[str, list[int]] = {}
    for shard in manifest.shards:
        path = folder / shard.name
        n_samples = n_bins = 0
        for sample in reader.read([str(path)]):
            where = f"{path}: {sample.key}"
            meta = sample.meta
            if meta.split != shard.split:  # slide and bin size: the reader's check (a fold view relabels splits)
                raise UserError(f"{where}: meta.json: split is {meta.split!r}, manifest says {shard.split!r}")
            counts = per_slide.setdefault(meta.slide, [0, 0])
            counts[0] += 1
            counts[1] += meta.n_bins
            n_samples, n_bins = n_samples + 1, n_bins + meta.n_bins
        for field, got in (("n_samples", n_samples), ("n_bins", n_bins)):
            if got != getattr(shard, field):
                raise UserError(f"{path}: {field}: {got} in the shard, manifest says {getattr(shard, field)}")
    for slide, rec in manifest.slides.items():
        got = per_slide.get(slide, [0, 0])
        if got != [rec["tiles"], rec["bins"]]:
            raise UserError(f"{manifest.path}: slides.{slide}: tiles/bins {rec['tiles']}/{rec['bins']}, "
                            f"shards hold {got[0]}/{got[1]}")
    return summary(manifest)

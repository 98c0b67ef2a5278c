"""The work of one slide: inspect it, then write its samples at every bin size; :class:`SlideWorker`
does it slide after slide with one frozen encoder.

A slide's samples at one bin size go to ``{bin}um/.work/{slide}/part-NNNNNN.tar`` plus
``done.json``; the folder is written under a temporary name and renamed when complete, so a
folder under its final name is a finished slide (re-runs skip it). Tile images are read once per
slide for all bin sizes (encoded bytes are spilled to an unlinked temporary file), features are
computed once per tile. Each record carries the seconds of the slide's phases (``phases``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from ray.experimental import tqdm_ray
from tqdm import tqdm

from magnet.format.check import Dims
from magnet.format.tar import PartWriter
from magnet.io import atomic_path

from .binned_outputs import BinFiles, read_bins
from .config import ShardConfig
from .features import FeatureExtractor
from .fingerprint import slide_fingerprints
from .genes import GeneStats
from .image import SlideImage
from .samples import Clock, Level, slide_samples, tile_grid
from .samplesheet import SlideEntry

DONE = "done.json"


def inspect_slide(entry: SlideEntry, bin_ums: list[int], n_genes: int, cfg: ShardConfig, stats_bin: int | None) -> dict:
    """Read every bin size in full (all input checks); gene statistics at ``stats_bin``; the slide's
    fingerprint at each bin size."""
    with SlideImage(entry.image) as image:
        size = image.size
    out = {"n_bins": {}, "stats": None, "fingerprint": slide_fingerprints(entry.image, entry.spaceranger, bin_ums)}
    for b in bin_ums:
        stats = GeneStats(n_genes, cfg.genes) if b == stats_bin else None
        bins = read_bins(BinFiles.of(entry.spaceranger, b), size, None, stats, with_barcodes=False)
        out["n_bins"][b] = len(bins.libsize)
        if stats is not None:
            stats.n_bins = len(bins.libsize)
            out["stats"] = stats
    return out


class SlideWorker:
    """One worker of ``magnet shard``: the frozen encoder is built once, on first use, then slide after
    slide is inspected and sharded. Run in the driver's process when there is one worker, else as one
    Ray actor per worker (``in_ray``: progress bars through Ray)."""

    def __init__(self, cfg: ShardConfig, in_ray: bool = False):
        self.cfg, self.in_ray = cfg, in_ray
        self._extractor = None

    def inspect(self, entry: SlideEntry, bin_ums: list[int], n_genes: int, stats_bin: int | None) -> dict:
        return inspect_slide(entry, bin_ums, n_genes, self.cfg, stats_bin)

    def shard(self, entry: SlideEntry, split: str, bin_ums: list[int], work_dirs: dict[int, str],
              genes: np.ndarray) -> dict[int, dict]:
        """:func:`shard_slide` with this worker's encoder; the first slide's records also count its build."""
        built = 0.0
        if self._extractor is None:
            t0 = time.perf_counter()
            device = "cuda" if self.cfg.ray.device != "cpu" and torch.cuda.is_available() else "cpu"
            self._extractor = FeatureExtractor(self.cfg.encoder, self.cfg.shard.geometry(), self.cfg.seed,
                                               self.cfg.ray.cpus_per_task, device)
            built = time.perf_counter() - t0
        progress = self.cfg.ray.progress
        records = shard_slide(entry, split, bin_ums, work_dirs, genes, self.cfg, self._extractor,
                              lambda total: _bar(progress, self.in_ray, entry.slide, total))
        for rec in records.values():
            rec["phases"]["encoder_build"] = round(built, 3)
        return records


def shard_slide(entry: SlideEntry, split: str, bin_ums: list[int], work_dirs: dict[int, str], genes: np.ndarray,
                cfg: ShardConfig, extractor, make_bar) -> dict[int, dict]:
    """Write the slide's samples for each of ``bin_ums`` into ``work_dirs[bin]/{slide}`` with ``extractor``
    (a :class:`~sharding.features.FeatureExtractor`); return their records. ``make_bar(total)``: a progress bar."""
    started = time.perf_counter()
    clock = Clock()
    geom = cfg.shard.geometry()
    records = {}
    with SlideImage(entry.image) as image:
        with clock("bins"):
            levels = {b: Level.read(entry.spaceranger, b, image, genes, cfg) for b in bin_ums}
        bar = make_bar(len(tile_grid(levels)) + sum(len(lv.tiles.grid) for lv in levels.values()))
        with slide_samples(entry.slide, image, levels, cfg, extractor, spill_dir=Path(work_dirs[bin_ums[0]]).parent,
                           clock=clock, progress=bar.update) as slide:
            for b, lv in levels.items():
                n_bins = n_total = 0
                with atomic_path(Path(work_dirs[b]) / entry.slide) as tmp:
                    tmp.mkdir()
                    dims = Dims(G=len(genes), K1=cfg.shard.k_neighbours + 1, S=geom.n_spots, F=extractor.dim,
                                P=geom.image_px, L=len(cfg.encoder.field_sd_um))
                    writer = PartWriter(tmp, cfg.shard.samples_per_shard, cfg.shard.bytes_per_shard, dims,
                                        cfg.shard.image_format)
                    for item in slide.samples(b, split):
                        with clock("write"):
                            writer.write(item.sample, item.image)
                        n_bins, n_total = n_bins + item.sample.n_bins, n_total + item.n_tile
                        bar.update(1)
                    records[b] = {"slide": entry.slide, "split": split, "bin_um": b, "tiles": len(lv.tiles.grid),
                                  "bins": n_bins, "bins_in_tiles": n_total, "bins_in_tissue": len(lv.bins.libsize),
                                  "feat_dim": extractor.dim, "encoder_weights": extractor.encoder.weights_id,
                                  "parts": writer.close(), "seconds": round(time.perf_counter() - started, 3)}
                    (tmp / DONE).write_text(json.dumps(records[b], indent=1, sort_keys=True))
        bar.close()
    for rec in records.values():  # the slide's phases, all bin sizes together (not in done.json)
        rec["phases"] = clock.rounded()
    return records


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, in_ray: bool, slide: str, total: int):
    if not progress:
        return _NoBar()
    bar = tqdm_ray.tqdm if in_ray else tqdm
    return bar(desc=f"slide {slide}", total=total, unit="tile")

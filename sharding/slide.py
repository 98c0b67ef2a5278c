"""The work of one slide: inspect it, then write its samples at every bin size; :class:`SlideWorker`
does it slide after slide with one frozen encoder.

A slide's samples at one bin size go to ``{bin}um/.work/{slide}/part-NNNNNN.tar`` plus
``done.json``; the folder is written under a temporary name and renamed when complete, so a
folder under its final name is a finished slide (re-runs skip it). Tile images are read once per
slide for all bin sizes (encoded bytes are spilled to an unlinked temporary file), features are
computed once per tile. Each record carries the seconds of the slide's phases (``phases``).
"""

from __future__ import annotations

import contextlib
import json
import time
import zlib
from pathlib import Path

import numpy as np

from magnet.format.sample import Meta, Sample
from magnet.format.tar import PartWriter
from magnet.format.validate import Dims
from magnet.io import atomic_path

from .config import ShardConfig
from .fingerprint import slide_fingerprints
from .genes import GeneStats, normalise
from .image import SlideImage
from .reader import BinFiles, Bins, read_bins, read_mpp
from .samplesheet import SlideEntry
from .tiles import TileSet, make_tiles
from .tile_images import EncodedTiles

DONE = "done.json"
TILES_PER_BATCH = 8  # tiles per encoder call: fixed, so features do not depend on scheduling


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


class Level:
    """One bin size of a slide: bins, tissue tiles, aggregated expression (also used by ``magnet predict``)."""

    @classmethod
    def read(cls, entry: SlideEntry, bin_um: int, image: SlideImage, genes: np.ndarray, cfg: ShardConfig) -> "Level":
        files = BinFiles.of(entry.spaceranger, bin_um)
        mpp_full = read_mpp(files.scalefactors, bin_um)
        return cls(read_bins(files, image.size, genes, with_barcodes=False), mpp_full, cfg)

    def __init__(self, bins: Bins, mpp_full: float, cfg: ShardConfig):
        geom = cfg.shard.geometry()
        self.mpp_full = mpp_full
        self.bins = bins
        xy = self.bins.xy * self.mpp_full / geom.mpp
        self.tiles: TileSet = make_tiles(xy, self.bins.rc, geom, cfg.shard.min_bins_per_tile, cfg.shard.k_neighbours)
        n_tiles, s = len(self.tiles.grid), geom.n_spots
        tile_of = np.repeat(np.arange(n_tiles), np.diff(self.tiles.bin_start))
        group = tile_of * s + self.tiles.spot[self.tiles.bin_order]
        import scipy.sparse as sp

        member = sp.csr_matrix((np.ones(len(group), np.float32), (group, self.tiles.bin_order)),
                               shape=(n_tiles * s, len(self.bins.libsize)))
        spot_counts = np.asarray((member @ self.bins.counts).todense(), np.float64).reshape(n_tiles, s, -1)
        spot_lib = np.bincount(group, self.bins.libsize[self.tiles.bin_order], n_tiles * s).reshape(n_tiles, s)
        self.spot_mask = np.bincount(group, minlength=n_tiles * s).reshape(n_tiles, s) > 0
        self.spot_expr = normalise(spot_counts, spot_lib, cfg.genes).astype(np.float16)
        self.global_expr = normalise(spot_counts.sum(1), spot_lib.sum(1), cfg.genes).astype(np.float16)


def make_sample(entry: SlideEntry, split: str, bin_um: int, lv: Level, t: int, feats: tuple,
                cfg: ShardConfig) -> tuple[Sample, int]:
    """Tile ``t``'s sample (without its image, which the caller holds encoded) and its tissue bin count."""
    sc, geom = cfg.shard, cfg.shard.geometry()
    tiles = lv.tiles
    gx, gy = (int(v) for v in tiles.grid[t])
    idx = tiles.bins_of(t)
    n_tile = len(idx)
    if sc.max_bins_per_sample and n_tile > sc.max_bins_per_sample:
        rng = np.random.default_rng([cfg.seed, zlib.crc32(entry.slide.encode()), bin_um, gx, gy])
        idx = idx[np.sort(rng.choice(n_tile, sc.max_bins_per_sample, replace=False))]
    counts = lv.bins.counts[idx].toarray()
    nbr = tiles.neighbours[t]
    mask = nbr >= 0
    nb = np.where(mask, nbr, 0)
    spot_feat, global_feat = feats
    m2, m3 = mask[:, None], mask[:, None, None]
    arrays = {
        "bin_xy": tiles.local_xy[idx],
        "bin_rc": lv.bins.rc[idx],
        "bin_spot": tiles.spot[idx],
        "bin_expr": normalise(counts, lv.bins.libsize[idx], cfg.genes).astype(np.float16),
        "spot_expr": np.where(m3, lv.spot_expr[nb], 0).astype(np.float16),
        "spot_mask": lv.spot_mask[nb] & m2,
        "spot_feat": np.where(m3, spot_feat[nb], 0).astype(np.float16),
        "global_expr": np.where(m2, lv.global_expr[nb], 0).astype(np.float16),
        "global_feat": np.where(m2, global_feat[nb], 0).astype(np.float16),
        "nbr_offset": ((tiles.grid[nb] - tiles.grid[t]) * geom.global_px * geom.mpp * m2).astype(np.float32),
        "nbr_mask": mask,
    }
    if sc.keep_counts:
        arrays["bin_counts"] = np.rint(counts).astype(np.int32)
        arrays["bin_libsize"] = lv.bins.libsize[idx].astype(np.float32)
    meta = Meta(slide=entry.slide, split=split, gx=gx, gy=gy, bin_um=bin_um, mpp=geom.mpp, n_bins=len(idx),
                n_bins_tile=n_tile)
    return Sample(meta=meta, arrays=arrays), n_tile


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
            import torch

            from .features import FeatureExtractor

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
    from .features import centre_on_slide

    started = time.perf_counter()
    clock = Clock()
    geom = cfg.shard.geometry()
    records = {}
    with SlideImage(entry.image) as image:
        with clock("bins"):
            levels = {b: Level.read(entry, b, image, genes, cfg) for b in bin_ums}
        mpp_full = levels[bin_ums[0]].mpp_full
        union = sorted({(int(gy), int(gx)) for lv in levels.values() for gx, gy in lv.tiles.grid})
        where = {yx: i for i, yx in enumerate(union)}
        spot_feat = np.zeros((len(union), geom.n_spots, extractor.dim), np.float16)
        global_feat = np.zeros((len(union), extractor.dim), np.float16)
        bar = make_bar(len(union) + sum(len(lv.tiles.grid) for lv in levels.values()))
        with EncodedTiles(image, geom, mpp_full, cfg.shard.image_format, cfg.shard.jpeg_quality,
                          Path(work_dirs[bin_ums[0]]).parent) as tile_images:
            for i in range(0, len(union), TILES_PER_BATCH):
                block = union[i:i + TILES_PER_BATCH]
                imgs = tile_images.read([(gx, gy) for gy, gx in block])
                with clock("features"):
                    spot_feat[i:i + len(block)], global_feat[i:i + len(block)] = extractor(imgs)
                bar.update(len(block))
            clock.seconds.update(tile_images.seconds)
            for b, lv in levels.items():
                uidx = np.array([where[(int(gy), int(gx))] for gx, gy in lv.tiles.grid], np.int64)
                with clock("features"):
                    feats = centre_on_slide(spot_feat[uidx], global_feat[uidx], lv.spot_mask)
                n_bins = n_total = 0
                with atomic_path(Path(work_dirs[b]) / entry.slide) as tmp:
                    tmp.mkdir()
                    dims = Dims(G=len(genes), K1=cfg.shard.k_neighbours + 1, S=geom.n_spots, F=extractor.dim,
                                P=geom.image_px)
                    writer = PartWriter(tmp, cfg.shard.samples_per_shard, cfg.shard.bytes_per_shard, dims,
                                        cfg.shard.image_format)
                    for t in range(len(lv.tiles.grid)):
                        with clock("samples"):
                            sample, n_tile = make_sample(entry, split, b, lv, t, feats, cfg)
                        with clock("write"):
                            writer.write(sample, tile_images.encoded(uidx[t]))
                        n_bins, n_total = n_bins + sample.n_bins, n_total + n_tile
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


class Clock:
    """Seconds per phase: ``with clock("features"): ...`` adds up (phases that interleave);
    ``clock.lap("checks")`` adds the time since the previous lap or the clock's start (phases in a row)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, phase: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, in_ray: bool, slide: str, total: int):
    if not progress:
        return _NoBar()
    if in_ray:
        from ray.experimental.tqdm_ray import tqdm
    else:
        from tqdm import tqdm

    return tqdm(desc=f"slide {slide}", total=total, unit="tile")

"""A slide as the samples the model sees, built one way for the shards and for ``magnet predict``.

:func:`slide_samples` takes a slide's image and its bins at one or more bin sizes (:class:`Level`: Space
Ranger's, :meth:`Level.read`, or laid over the tissue for H&E-only prediction), reads every global tile
once (encoded as in the shards, spilled to an unlinked temporary file), runs the frozen extractor over
them in blocks, and then :meth:`SlideSamples.samples` yields each tile's sample (:func:`make_sample`)
with its encoded image, features centred on the slide. ``sharding/slide.py`` writes them to the shards;
``magnet/predict/slide.py`` runs the model on them.

This module is also the one entry of ``magnet.predict`` into ``sharding`` (tests/test_import_graph.py):
``__all__`` names what prediction uses of the sharding stage, the iterator's parts and a few re-exported names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from magnet.format.sample import Meta, Sample

from .bin_features import bin_features, with_bin_features
from .binned_outputs import BinFiles, Bins, read_bins, read_genes, read_mpp
from .config import EncoderConfig, GeneConfig, SampleConfig, ShardConfig
from .feature_field import feature_field
from .features import FeatureExtractor, centre_on_slide
from .genes import normalise
from .image import SlideImage, thumbnail
from .pairing import check_pairing
from .ray_cluster import ray_session
from .samplesheet import SlideEntry, read_samplesheet
from .tile_images import EncodedTiles
from .tiles import TileSet, make_tiles

TILES_PER_BATCH = 8  # tiles per encoder call when sharding: fixed, so features do not depend on scheduling

__all__ = [
    "TILES_PER_BATCH", "Clock", "Level", "TileSample", "SlideSamples", "slide_samples", "make_sample", "tile_grid",
    "EncoderConfig", "GeneConfig", "SampleConfig", "ShardConfig", "FeatureExtractor", "SlideImage", "thumbnail",
    "check_pairing", "ray_session", "BinFiles", "Bins", "read_bins", "read_genes", "read_mpp", "SlideEntry",
    "read_samplesheet",
]


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


class Level:
    """One bin size of a slide: bins, tissue tiles, aggregated expression."""

    @classmethod
    def read(cls, outs: Path, bin_um: int, image: SlideImage, genes: np.ndarray, cfg: ShardConfig) -> "Level":
        """Space Ranger's bins of ``bin_um`` (``genes``: matrix indices of the genes kept), without barcodes."""
        files = BinFiles.of(outs, bin_um)
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
        import scipy.sparse as sp  # start-up time: the CLI imports this module

        member = sp.csr_matrix((np.ones(len(group), np.float32), (group, self.tiles.bin_order)),
                               shape=(n_tiles * s, len(self.bins.libsize)))
        spot_counts = np.asarray((member @ self.bins.counts).todense(), np.float64).reshape(n_tiles, s, -1)
        spot_lib = np.bincount(group, self.bins.libsize[self.tiles.bin_order], n_tiles * s).reshape(n_tiles, s)
        self.spot_mask = np.bincount(group, minlength=n_tiles * s).reshape(n_tiles, s) > 0
        self.spot_expr = normalise(spot_counts, spot_lib, cfg.genes).astype(np.float16)
        # raw sums for the spot and global count likelihoods (shard.keep_counts)
        self.spot_counts = np.rint(spot_counts).astype(np.int32) if cfg.shard.keep_counts else None
        self.spot_lib = spot_lib
        self.global_expr = normalise(spot_counts.sum(1), spot_lib.sum(1), cfg.genes).astype(np.float16)


@dataclasses.dataclass
class TileSample:
    """One tile's sample (without its image), its image encoded as in the shards, and its bins."""

    sample: Sample
    image: bytes
    bins: np.ndarray  # int64: the level's bins in the sample, in the sample's order
    n_tile: int  # the tile's tissue bins (more than the sample's when max_bins_per_sample cut them)
    tile: int  # row of the tile in the level's grid


def sample_bins(slide: str, bin_um: int, lv: Level, t: int, cfg: ShardConfig) -> np.ndarray:
    """The level's bins in tile ``t``'s sample: all of the tile's, or a seeded subsample of
    ``shard.max_bins_per_sample``."""
    idx = lv.tiles.bins_of(t)
    cap = cfg.shard.max_bins_per_sample
    if cap and len(idx) > cap:
        gx, gy = (int(v) for v in lv.tiles.grid[t])
        rng = np.random.default_rng([cfg.seed, zlib.crc32(slide.encode()), bin_um, gx, gy])
        idx = idx[np.sort(rng.choice(len(idx), cap, replace=False))]
    return idx


def make_sample(slide: str, split: str, bin_um: int, lv: Level, t: int, feats: tuple,
                cfg: ShardConfig) -> tuple[Sample, np.ndarray]:
    """Tile ``t``'s sample (without its image, which the caller holds encoded) and the bins it holds."""
    sc, geom = cfg.shard, cfg.shard.geometry()
    tiles = lv.tiles
    gx, gy = (int(v) for v in tiles.grid[t])
    idx, n_tile = sample_bins(slide, bin_um, lv, t, cfg), len(tiles.bins_of(t))
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
        arrays["spot_counts"] = np.where(m3, lv.spot_counts[nb], 0).astype(np.int32)
        arrays["spot_libsize"] = np.where(m2, lv.spot_lib[nb], 0).astype(np.float32)
        arrays["global_counts"] = np.where(m2, lv.spot_counts[nb].sum(1), 0).astype(np.int32)
        arrays["global_libsize"] = np.where(mask, lv.spot_lib[nb].sum(1), 0).astype(np.float32)
    meta = Meta(slide=slide, split=split, gx=gx, gy=gy, bin_um=bin_um, mpp=geom.mpp, n_bins=len(idx),
                n_bins_tile=n_tile)
    return Sample(meta=meta, arrays=arrays), idx


def tile_grid(levels: dict[int, Level]) -> np.ndarray:
    """(gx, gy) of every tile of any of the levels, row-major (gy, then gx): the tiles whose features are computed."""
    union = sorted({(int(gy), int(gx)) for lv in levels.values() for gx, gy in lv.tiles.grid})
    return np.array([(gx, gy) for gy, gx in union], np.int64).reshape(-1, 2)


class SlideSamples:
    """The samples of one slide at each of its levels' bin sizes; made by :func:`slide_samples`. The frozen
    features of every tile of any level (``grid``, row-major) are computed once, for all bin sizes."""

    def __init__(self, slide: str, levels: dict[int, Level], cfg: ShardConfig, tile_images: EncodedTiles,
                 clock: Clock):
        self.slide, self.levels, self.cfg, self.clock = slide, levels, cfg, clock
        self.tile_images = tile_images
        self.grid = tile_grid(levels)
        self.row = {(int(gx), int(gy)): i for i, (gx, gy) in enumerate(self.grid)}
        self._feats: tuple[int, tuple] | None = None
        self.extractor: FeatureExtractor | None = None

    def encode(self, extractor: FeatureExtractor, block: int, progress: Callable[[int], None]) -> None:
        """Read and encode every tile and compute its features, ``block`` tiles per extractor call;
        ``progress(n)`` after each block."""
        n, s = len(self.grid), self.cfg.shard.geometry().n_spots
        self.extractor = extractor
        self.spot_feat = np.zeros((n, s, extractor.dim), np.float16)
        self.global_feat = np.zeros((n, extractor.dim), np.float16)
        for i in range(0, n, block):
            imgs = self.tile_images.read(self.grid[i:i + block])
            with self.clock("features"):
                self.spot_feat[i:i + len(imgs)], self.global_feat[i:i + len(imgs)] = extractor(imgs)
            progress(len(imgs))
        self.clock.seconds.update(self.tile_images.seconds)

    def rows(self, bin_um: int) -> np.ndarray:
        """Rows in ``grid`` of the level's tiles."""
        return np.array([self.row[(int(gx), int(gy))] for gx, gy in self.levels[bin_um].tiles.grid], np.int64)

    def features(self, bin_um: int) -> tuple[np.ndarray, np.ndarray]:
        """Spot (T, S, F) and global (T, F) features of the level's tiles, centred on the slide (kept for the
        last bin size asked)."""
        if self._feats is None or self._feats[0] != bin_um:
            self._feats = None  # the previous level's are freed first
            lv, rows = self.levels[bin_um], self.rows(bin_um)
            every = len(rows) == len(self.grid)  # the level's tiles are the grid (one level): no copy
            with self.clock("features"):
                self._feats = bin_um, centre_on_slide(self.spot_feat if every else self.spot_feat[rows],
                                                      self.global_feat if every else self.global_feat[rows],
                                                      lv.spot_mask)
        return self._feats[1]

    def samples(self, bin_um: int, split: str) -> Iterator[TileSample]:
        """The level's samples, tile after tile (row-major)."""
        lv, rows, feats = self.levels[bin_um], self.rows(bin_um), self.features(bin_um)
        fields = self.fields(bin_um) if self.cfg.encoder.field_sd_um else None
        for t in range(len(lv.tiles.grid)):
            with self.clock("samples"):
                sample, idx = make_sample(self.slide, split, bin_um, lv, t, feats, self.cfg)
            encoded = self.tile_images.encoded(rows[t])
            if fields is not None:  # the bin features, computed for the whole slide first, and their field
                sample = sample.replace(bin_feat=fields[t][0], bin_field=fields[t][1])
            elif self.cfg.encoder.bin_features:  # each bin's frozen feature (encoder.bin_features)
                with self.clock("bin_features"):
                    sample = with_bin_features(sample, self.extractor, encoded)
            yield TileSample(sample, encoded, idx, len(lv.tiles.bins_of(t)), t)

    def fields(self, bin_um: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(bin_feat, bin_field) of each of the level's samples (encoder.field_sd_um): the field needs every bin's
        feature first, so the level's bin features and their field are held in memory (bins x F x 2 x (1 + L)
        bytes). With ``shard.max_bins_per_sample`` the field is the mean over the samples' bins, a subsample of the
        tissue's (``magnet predict`` keeps every bin: the same mean, estimated from more bins)."""
        lv, rows = self.levels[bin_um], self.rows(bin_um)
        bin_feats, bins = [], []
        for t in range(len(lv.tiles.grid)):
            idx = sample_bins(self.slide, bin_um, lv, t, self.cfg)
            with self.clock("bin_features"):
                bin_feats.append(bin_features(self.extractor, self.tile_images.encoded(rows[t]), lv.tiles.local_xy[idx]))
            bins.append(idx)
        every = np.concatenate(bins)
        with self.clock("feature_field"):
            field = feature_field(lv.bins.xy[every] * lv.mpp_full, np.concatenate(bin_feats),
                                  list(self.cfg.encoder.field_sd_um), bin_um)
        ends = np.cumsum([len(i) for i in bins])
        return list(zip(bin_feats, np.split(field, ends[:-1])))


@contextlib.contextmanager
def slide_samples(slide: str, image: SlideImage, levels: dict[int, Level], cfg: ShardConfig, extractor, *,
                  block: int = TILES_PER_BATCH, spill_dir: Path | None = None, clock: Clock | None = None,
                  progress: Callable[[int], None] = lambda n: None) -> Iterator[SlideSamples]:
    """The slide's :class:`SlideSamples`, features computed (``block`` tiles per call of ``extractor``, a
    :class:`~sharding.features.FeatureExtractor`); tile images spilled in ``spill_dir`` (None: the system's
    temporary folder) while open. ``clock`` adds up the phases' seconds."""
    clock = clock or Clock()
    mpp_full = next(iter(levels.values())).mpp_full
    with EncodedTiles(image, cfg.shard.geometry(), mpp_full, cfg.shard.image_format, cfg.shard.jpeg_quality,
                      spill_dir) as tile_images:
        samples = SlideSamples(slide, levels, cfg, tile_images, clock)
        samples.encode(extractor, block, progress)
        yield samples

"""Decoded shard samples (:class:`magnet.format.sample.Sample`) cut from a virtual slide, for tests and bench.

The slide is a grid of ``n_tiles`` global tiles; each tile's features and expression derive from
its own seed, so a tile seen as a neighbour in two samples has the same content, as in real shards.
Only the sampled neighbourhoods are materialised, so a 20,000-tile slide costs what a 400-tile one does.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree

from magnet.format.sample import Meta, Sample
from magnet.geometry import Geometry


def _normalise(counts: np.ndarray, target: float = 100.0) -> np.ndarray:
    lib = counts.sum(-1, keepdims=True)
    return np.log1p(counts / np.maximum(lib, 1) * target)


class VirtualSlide:
    def __init__(self, n_tiles: int, *, geometry: Geometry, n_genes: int = 16, feat_dim: int = 32, k: int = 8,
                 bins_per_tile: int = 12, bin_um: float = 8.0, slide: str = "slide0", seed: int = 0):
        side = math.ceil(math.sqrt(n_tiles))
        ids = np.arange(n_tiles)
        self.grid = np.stack([ids % side, ids // side], 1)
        self.geometry, self.n_genes, self.feat_dim, self.k = geometry, n_genes, feat_dim, k
        self.bins_per_tile, self.bin_um, self.slide, self.seed = bins_per_tile, bin_um, slide, seed
        self.centres_um = (self.grid + 0.5) * geometry.global_px * geometry.mpp
        self.tree = cKDTree(self.centres_um)

    def _tile(self, t: int) -> dict:
        """Per-tile content from the tile's own seed: spot profiles, features, summed expression."""
        g, S = self.geometry, self.geometry.n_spots
        rng = np.random.default_rng((self.seed, t))
        profile = np.exp(rng.normal(0, 1, (S, self.n_genes)))  # expected counts per bin, per cell
        xy = g.margin + rng.uniform(0, g.global_px, (self.bins_per_tile, 2)).astype(np.float32)
        cell = g.spot_of(xy).astype(np.int64)
        counts = rng.poisson(profile[cell] * 2.0)
        spot_counts = np.zeros((S, self.n_genes))
        np.add.at(spot_counts, cell, counts)
        return {
            "xy": xy, "cell": cell, "counts": counts,
            "spot_expr": _normalise(spot_counts), "spot_mask": np.bincount(cell, minlength=S) > 0,
            "spot_feat": rng.normal(0, 1, (S, self.feat_dim)), "global_feat": rng.normal(0, 1, self.feat_dim),
            "global_expr": _normalise(spot_counts.sum(0)),
        }

    def sample(self, t: int) -> Sample:
        """The decoded sample of tile ``t`` (centre first, then its ``k`` nearest tiles)."""
        g = self.geometry
        k1 = self.k + 1
        n_real = min(k1, len(self.grid))
        _, nbrs = self.tree.query(self.centres_um[t], k=n_real)
        nbrs = np.atleast_1d(nbrs)
        tiles = [self._tile(int(j)) for j in nbrs]
        pad = k1 - n_real

        def stack(key, dtype):
            a = np.stack([tl[key] for tl in tiles]).astype(dtype)
            return np.concatenate([a, np.zeros((pad,) + a.shape[1:], dtype)]) if pad else a

        own = tiles[0]
        gx, gy = (int(v) for v in self.grid[t])
        slide_px = np.array([gx, gy]) * g.global_px - g.margin + own["xy"]
        offset = np.zeros((k1, 2), np.float32)
        offset[:n_real] = self.centres_um[nbrs] - self.centres_um[t]
        image = np.random.default_rng((self.seed, t, 1)).integers(0, 256, (g.image_px, g.image_px, 3), dtype=np.uint8)
        arrays = {
            "image": image,
            "bin_xy": own["xy"],
            "bin_rc": np.floor(slide_px[:, ::-1] * g.mpp / self.bin_um).astype(np.int32),
            "bin_spot": own["cell"].astype(np.int16),
            "bin_expr": _normalise(own["counts"]).astype(np.float16),
            "spot_expr": stack("spot_expr", np.float16),
            "spot_mask": stack("spot_mask", bool),
            "spot_feat": stack("spot_feat", np.float16),
            "global_expr": stack("global_expr", np.float16),
            "global_feat": stack("global_feat", np.float16),
            "nbr_offset": offset,
            "nbr_mask": np.arange(k1) < n_real,
        }
        meta = Meta(slide=self.slide, split="train", gx=gx, gy=gy, bin_um=self.bin_um, mpp=g.mpp, n_bins=len(own["xy"]))
        return Sample(meta=meta, arrays=arrays)

    def samples(self, n: int, seed: int = 0) -> list[Sample]:
        tiles = np.random.default_rng(seed).choice(len(self.grid), size=n, replace=False)
        return [self.sample(int(t)) for t in tiles]


TINY_GEOMETRY = Geometry(mpp=0.5, global_px=64, spot_px=32, bin_px=32)

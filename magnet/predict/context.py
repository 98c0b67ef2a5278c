"""Inference-time context controls (``predict.context``): how much of a model's prediction comes from context.

A MagNet model sees a bin's context through the frozen tile features of the batch:
``Batch.spot_feat`` (every spot cell of the bin's tile and of its neighbour tiles) and
``Batch.glob_feat`` (those tiles as a whole), both already centred on the slide's mean feature
(:func:`sharding.features.centre_on_slide`). A control rewrites exactly these two tensors of every
batch before the forward pass; the bin's own patch, every position, offset, mask and graph stay as they
are, so any model reading context from the batch gets the same control. A model trained with ``model.field``
also reads the bins' feature field (``Batch.bin_field``): the controls leave it as it is, so they measure what the
spot and global levels add beside it:

- ``zero``: both set to 0, i.e. every tile's context replaced by the slide's mean feature (the centring
  makes 0 the slide average, a neutral input, where raw zeros would be out of distribution);
- ``shuffle``: a seeded permutation ``pi`` of the slide's tiles (``numpy.random.default_rng(context_seed)``,
  so ``magnet predict`` and ``magnet evaluate`` shuffle a slide alike);
  every global node of tile ``t`` takes the global feature of tile ``pi(t)``, and its spot nodes that
  tile's spot features (cell by cell), wherever ``t`` appears in whichever batch. Context keeps its
  distribution on the slide but no longer matches the bin's place (a tile maps to itself with chance
  1/T).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from magnet.batch import Batch
from magnet.geometry import Geometry

CONTROLS = ("keep", "zero", "shuffle")


class ContextControl:
    """Called on each :class:`Batch` of one slide: the batch with its context features rewritten."""

    def __init__(self, mode: str, grid: np.ndarray, spot_feat: np.ndarray, global_feat: np.ndarray,
                 geometry: Geometry, seed: int):
        if mode not in CONTROLS[1:]:
            raise ValueError(f"context control must be one of {CONTROLS[1:]}, got {mode!r}")
        self.mode = mode
        self.tile_um = geometry.global_px * geometry.mpp
        self.index = {(int(gx), int(gy)): t for t, (gx, gy) in enumerate(grid)}
        perm = np.random.default_rng(seed).permutation(len(grid))
        self.spot = torch.from_numpy(spot_feat[perm].astype(np.float32))  # row t: the features tile t gets
        self.glob = torch.from_numpy(global_feat[perm].astype(np.float32))

    def tiles_of(self, batch: Batch) -> np.ndarray:
        """Slide tile index of every global node of the batch (-1: absent neighbour)."""
        gxy = np.rint(batch.glob_pos.double().numpy() / self.tile_um - 0.5).astype(np.int64)
        t = np.array([self.index.get((int(x), int(y)), -1) for x, y in gxy], np.int64)
        return np.where(batch.glob_mask.numpy(), t, -1)

    def __call__(self, batch: Batch) -> Batch:
        if self.mode == "zero":
            return dataclasses.replace(batch, spot_feat=torch.zeros_like(batch.spot_feat),
                                       glob_feat=torch.zeros_like(batch.glob_feat))
        tiles = self.tiles_of(batch)
        if (batch.glob_mask.numpy() & (tiles < 0)).any():
            raise RuntimeError("a global node of the batch lies on no tile of the slide")
        ok = torch.from_numpy(tiles >= 0)
        src = torch.from_numpy(np.maximum(tiles, 0))
        Ng, F = batch.glob_feat.shape
        glob = torch.where(ok[:, None], self.glob[src], batch.glob_feat)
        spot = batch.spot_feat.reshape(Ng, -1, F)
        spot = torch.where(ok[:, None, None], self.spot[src], spot).reshape(-1, F)
        return dataclasses.replace(batch, spot_feat=spot, glob_feat=glob)

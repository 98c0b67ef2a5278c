"""The slide-wide global tile grid, the tissue filter and the k-nearest-tile neighbourhoods."""

from __future__ import annotations

import dataclasses

import numpy as np

from magnet.geometry import Geometry


@dataclasses.dataclass
class TileSet:
    """Tissue tiles of one slide at one bin size, in row-major (gy, gx) order."""

    grid: np.ndarray  # int64 (T, 2): gx, gy
    bin_order: np.ndarray  # int64 (n,): bins sorted by tile, then array row, array col
    bin_start: np.ndarray  # int64 (T + 1,): tile t holds bin_order[bin_start[t]:bin_start[t + 1]]
    local_xy: np.ndarray  # float32 (n,): tile-local px of each bin (indexed like the bins, not bin_order)
    spot: np.ndarray  # int16 (n,): spot cell of each bin
    neighbours: np.ndarray  # int64 (T, K + 1): tile indices, centre first, -1 = padding

    def bins_of(self, t: int) -> np.ndarray:
        return self.bin_order[self.bin_start[t]:self.bin_start[t + 1]]


def make_tiles(xy_model: np.ndarray, rc: np.ndarray, geom: Geometry, min_bins: int, k: int) -> TileSet:
    """Assign bins (model-px centres) to global tiles; keep tiles with ``>= min_bins`` bins."""
    g = np.floor(xy_model / geom.global_px).astype(np.int64)
    lo = g.min(0, initial=0)
    width = g[:, 0].max(initial=0) - lo[0] + 1
    # one int64 key per bin, ordered as (gy, gx): a 1-D unique (sorting rows of g costs several copies)
    keys, inverse, n_per = np.unique((g[:, 1] - lo[1]) * width + (g[:, 0] - lo[0]), return_inverse=True,
                                     return_counts=True)
    del g
    keep = n_per >= min_bins
    new_index = np.cumsum(keep) - 1
    tile = np.where(keep[inverse], new_index[inverse], -1)
    del inverse
    keys = keys[keep]
    grid = np.stack([keys % width + lo[0], keys // width + lo[1]], 1)
    origin = grid * geom.global_px - geom.margin
    kept = np.flatnonzero(tile >= 0)
    local = np.zeros_like(xy_model, dtype=np.float32)
    local[kept] = (xy_model[kept] - origin[tile[kept]]).astype(np.float32)
    spot = np.zeros(len(xy_model), np.int16)
    spot[kept] = geom.spot_of(local[kept])
    order = kept[np.lexsort((rc[kept, 1], rc[kept, 0], tile[kept]))]
    start = np.searchsorted(tile[order], np.arange(len(grid) + 1))
    return TileSet(grid=grid, bin_order=order, bin_start=start, local_xy=local, spot=spot,
                   neighbours=nearest_tiles(grid, k))


def nearest_tiles(grid: np.ndarray, k: int) -> np.ndarray:
    """(T, k + 1) indices of the k nearest tiles of each tile (itself first), padded with -1."""
    from scipy.spatial import cKDTree  # start-up time: the CLI imports this module

    n = len(grid)
    out = np.full((n, k + 1), -1, np.int64)
    if n == 0:
        return out
    kk = min(k + 1, n)
    _, idx = cKDTree(grid.astype(np.float64)).query(grid.astype(np.float64), k=kk)
    out[:, :kk] = idx.reshape(n, kk)  # tiles are distinct, so each tile's own index (distance 0) comes first
    return out

"""The Visium HD bin grid and its registration against the image.

Grid coordinates ``(u, v)`` are microns along the bin columns and rows, origin at the outer corner
of bin (0, 0). The image frame ``(x, y)`` in microns is ``R(theta) (u, v) + offset``; a full-res
pixel ``(row, col)`` spans ``[col, col + 1) x [row, row + 1)`` in units of ``mpp``, so a point's
``pxl_col_in_fullres`` is ``x / mpp`` and ``pxl_row_in_fullres`` is ``y / mpp``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

BIN_SIZES_UM = (2, 8, 16)
MAX_ROTATION_DEG = 1.0


@dataclasses.dataclass(frozen=True)
class BinGrid:
    n2: int  # 2 um bins per side (a multiple of 8, so 8 and 16 um bins are whole blocks)
    theta: float  # radians
    offset: tuple[float, float]  # (x, y) um of the grid origin in the image frame

    def n_side(self, bin_um: int) -> int:
        return self.n2 * 2 // bin_um

    def to_grid(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.theta), np.sin(self.theta)
        dx, dy = x - self.offset[0], y - self.offset[1]
        return c * dx + s * dy, -s * dx + c * dy

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, s = np.cos(self.theta), np.sin(self.theta)
        return c * u - s * v + self.offset[0], s * u + c * v + self.offset[1]

    def centres_um(self, bin_um: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Row-major (array_row, array_col, x, y) of every bin centre; x, y in image microns."""
        n = self.n_side(bin_um)
        rows, cols = np.divmod(np.arange(n * n, dtype=np.int64), n)
        x, y = self.to_image((cols + 0.5) * bin_um, (rows + 0.5) * bin_um)
        return rows, cols, x, y


def random_grid(size_um: float, rng: np.random.Generator) -> BinGrid:
    """A grid covering most of the scanned area, rotated by up to 1 degree and offset at random."""
    theta = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    spare = 0.05 * size_um
    side = 16 * int((size_um - spare) // 16)
    room = (size_um - side) / 2 - side * abs(np.sin(theta)) - 1.0  # keep the rotated corners inside
    centre = size_um / 2 + rng.uniform(-1, 1, 2) * max(room, 0.0) * 0.8
    c, s = np.cos(theta), np.sin(theta)
    half = side / 2
    offset = (centre[0] - (c * half - s * half), centre[1] - (s * half + c * half))
    return BinGrid(side // 2, float(theta), (float(offset[0]), float(offset[1])))

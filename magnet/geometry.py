"""The physical layout of a shard sample (docs/shard_format.md), shared by sharding, data and predict."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, kw_only=True)
class Geometry:
    """Sizes in pixels at the model pixel size ``mpp`` (um/px)."""

    mpp: float = 0.5
    global_px: int = 512
    spot_px: int = 224
    bin_px: int = 112

    def __post_init__(self):
        if self.mpp <= 0:
            raise ValueError(f"mpp must be > 0, got {self.mpp}")
        if not 0 < self.bin_px <= self.spot_px <= self.global_px:
            raise ValueError(
                f"need 0 < bin_px <= spot_px <= global_px, got {self.bin_px}, {self.spot_px}, {self.global_px}"
            )

    @property
    def spots_per_side(self) -> int:
        return max(1, round(self.global_px / self.spot_px))

    @property
    def n_spots(self) -> int:
        return self.spots_per_side**2

    @property
    def margin(self) -> int:
        return self.bin_px // 2

    @property
    def image_px(self) -> int:
        """Side of the stored tile image (tile plus margin on each side)."""
        return self.global_px + 2 * self.margin

    def spot_centres(self) -> np.ndarray:
        """(S, 2) float32 spot-cell centres (x, y) in tile-local px; cell j = row * s + col."""
        s = self.spots_per_side
        c = self.margin + (np.arange(s) + 0.5) * self.global_px / s
        xx, yy = np.meshgrid(c, c)  # rows vary y, columns vary x
        return np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float32)

    def spot_of(self, xy: np.ndarray) -> np.ndarray:
        """Spot cell index of tile-local points (N, 2); points in the margin clip to the edge cell."""
        s = self.spots_per_side
        cell = np.floor((np.asarray(xy, dtype=np.float64) - self.margin) * s / self.global_px).astype(np.int64)
        cell = np.clip(cell, 0, s - 1)
        return (cell[:, 1] * s + cell[:, 0]).astype(np.int16)

    def tile_origin_px(self, gx: int, gy: int) -> tuple[int, int]:
        """Slide model-pixel coordinates (x, y) of the stored image's pixel (0, 0)."""
        return gx * self.global_px - self.margin, gy * self.global_px - self.margin

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(spots_per_side=self.spots_per_side, margin=self.margin, image_px=self.image_px)
        return d

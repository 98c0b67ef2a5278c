"""A decoded shard sample: its key, its :class:`Meta` and its arrays named as the schema's members."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from magnet.format.schema import FORMAT_VERSION, sample_key


@dataclasses.dataclass(frozen=True)
class Meta:
    """``meta.json``. ``n_bins``: bins stored; ``n_bins_tile``: tissue bins of the tile (more when capped)."""

    slide: str
    gx: int
    gy: int
    mpp: float
    bin_um: float = 0.0
    split: str = ""
    n_bins: int = -1
    n_bins_tile: int = -1
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Meta:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown field {unknown[0]!r}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Sample:
    """``arrays``: member name -> numpy array (``image`` uint8 (P, P, 3)); ``url``: the shard it came
    from; ``index``: its position in the stream (seeds its per-sample random choices)."""

    meta: Meta
    arrays: dict[str, np.ndarray]
    url: str = ""
    index: int = 0

    @property
    def key(self) -> str:
        return sample_key(self.meta.slide, self.meta.gx, self.meta.gy)

    @property
    def n_bins(self) -> int:
        return len(self.arrays["bin_xy"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def replace(self, **arrays: np.ndarray) -> Sample:
        """A copy with the given arrays replaced (the others shared)."""
        return dataclasses.replace(self, arrays={**self.arrays, **arrays})

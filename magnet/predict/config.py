"""The typed config of ``magnet predict`` (``--config FILE`` and ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class PredictConfig:
    batch_size: int = 0  # global-tile chunks per forward pass; 0 = the model's data.eval_batch
    max_bins: int = 0  # bins per chunk of a tile (the bin graph is built within a chunk); 0 = the model's data.max_bins
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    encoder_weights: str | None = None  # the shards' local encoder checkpoint, when model_meta.json names one by sha256
    threads: int = 0  # torch CPU threads; 0 = torch's default
    tiles_per_block: int = 8  # tiles read and encoded together (frozen-encoder batch, memory bound)
    image_format: Literal["jpg", "png", "webp"] = "jpg"  # bin-patch encoding, as the shards were (training input)
    jpeg_quality: int = 90
    tissue_level_um: float = 8.0  # image-only input: pixel size (um) of the image tissue is detected on
    tissue_min_fraction: float = 0.5  # image-only input: a bin is kept when this share of it is tissue
    hires_px: int = 2000  # longest side of uns['spatial'] images when Space Ranger gives none
    lowres_px: int = 600
    progress: bool = True
    context: Literal["keep", "zero", "shuffle"] = "keep"  # inference-time context control (magnet/predict/context.py)
    context_seed: int = 0  # of the shuffle control's tile permutation

    def __post_init__(self):
        if min(self.batch_size, self.max_bins, self.threads) < 0 or self.tiles_per_block < 1:
            raise ValueError("batch_size, max_bins, threads must be >= 0 and tiles_per_block >= 1")
        if self.tissue_level_um <= 0 or not 0 < self.tissue_min_fraction <= 1:
            raise ValueError("tissue_level_um must be > 0 and tissue_min_fraction in (0, 1]")
        if min(self.hires_px, self.lowres_px) < 16:
            raise ValueError("hires_px and lowres_px must be >= 16")

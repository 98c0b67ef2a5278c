"""The typed config of ``magnet predict`` (``--config FILE`` and ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class CohortConfig:
    """``--samplesheet``: Ray workers, each loading the model once. ``num_cpus`` and ``object_store_mb`` size a
    local Ray only (ignored with ``--address``)."""

    workers: int = 0  # 0 = one per GPU of the cluster, else one per cpus_per_worker CPUs
    cpus_per_worker: int = 1  # also the worker's torch threads (unless ``threads`` is set)
    gpus_per_worker: float = 1.0  # used when the cluster has GPUs
    num_cpus: int = 0  # local Ray: 0 = all cores of this machine
    object_store_mb: int = 256

    def __post_init__(self):
        if min(self.workers, self.num_cpus) < 0 or self.cpus_per_worker < 1 or self.object_store_mb < 64:
            raise ValueError("workers, num_cpus must be >= 0, cpus_per_worker >= 1, object_store_mb >= 64")
        if not self.gpus_per_worker > 0:
            raise ValueError("gpus_per_worker must be > 0")


@dataclasses.dataclass(kw_only=True)
class PredictConfig:
    batch_size: int = 0  # global-tile chunks per forward pass; 0 = max(the model's data.eval_batch, batch_bins // max_bins)
    # bins per forward pass that batch_size 0 aims at (0: the model's eval_batch). Each chunk's bin graph is its own
    # (magnet/batch.py), so the batch size changes no output beyond fp32 rounding. Bins per CPU-s on the tiny model
    # (test_resnet, 112 px patches, 32-bin chunks), one run: 128 bins (its eval_batch) 485, 256 506, 512 515, 1024 519
    batch_bins: int = 512
    max_bins: int = 0  # bins per chunk of a tile (the bin graph is built within a chunk); 0 = the model's data.max_bins
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    fold_bn: bool = True  # fold the bin encoder's batch norms into its convolutions (same outputs up to fp32 rounding)
    channels_last: bool = True  # channels-last bin encoder (False: as the model was trained)
    # CPU: bin patches per bin-encoder call, counted in pixels (401408: 32 patches of 112 px, 174 of 48 px); 0 = a
    # whole batch per call (always on CUDA). Small calls keep a conv's activations in cache (test_resnet at 112 px:
    # 830 patches per CPU-s in calls of 32, 530 in calls of 256); each patch's embedding is its own
    encoder_px: int = 401408
    # glibc serves allocations of this size and more by mmap (magnet/predict/slide.py fixed_mmap_threshold): the
    # encoder's calls reuse heap memory below it, batch-wide arrays above it leave no fragments (0.25 before issue 15)
    mmap_threshold_mb: float = 32.0
    compile: bool = False  # torch.compile the bin encoder (minutes of compiling first; pays off on large cohorts)
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
    cohort: CohortConfig = dataclasses.field(default_factory=CohortConfig)

    def __post_init__(self):
        if min(self.batch_size, self.batch_bins, self.max_bins, self.encoder_px, self.threads) < 0:
            raise ValueError("batch_size, batch_bins, max_bins, encoder_px, threads must be >= 0")
        if self.tiles_per_block < 1:
            raise ValueError("tiles_per_block must be >= 1")
        if not self.mmap_threshold_mb > 0:
            raise ValueError("mmap_threshold_mb must be > 0")
        if self.tissue_level_um <= 0 or not 0 < self.tissue_min_fraction <= 1:
            raise ValueError("tissue_level_um must be > 0 and tissue_min_fraction in (0, 1]")
        if min(self.hires_px, self.lowres_px) < 16:
            raise ValueError("hires_px and lowres_px must be >= 16")

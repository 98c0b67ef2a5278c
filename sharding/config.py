"""The sharding stage's typed config (``magnet shard --config FILE key=value ...``).

Sizes are physical: pixel sizes are at the model pixel size ``shard.mpp`` (um/px), the same for
every slide whatever its scanner. Every field is recorded in each bin size's ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from magnet.geometry import Geometry


@dataclasses.dataclass(kw_only=True)
class SampleConfig:
    """Geometry, tissue filter, image encoding and shard size (docs/shard_format.md)."""

    mpp: float = 0.5
    global_px: int = 512
    spot_px: int = 224
    bin_px: int = 112
    min_bins_per_tile: int = 1  # tissue filter: a global tile with fewer tissue bins is skipped
    max_bins_per_sample: int = 0  # 0 = all; else a seeded subsample (2 um bins: ~16k per 256 um tile)
    image_format: Literal["jpg", "png", "webp"] = "jpg"  # png / webp are lossless
    jpeg_quality: int = 90
    keep_counts: bool = False  # also store raw counts and library sizes of bins, spot cells and tiles (*_counts, *_libsize)
    k_neighbours: int = 8
    samples_per_shard: int = 256
    bytes_per_shard: int = 256 * 2**20  # a shard is closed at whichever limit comes first

    def __post_init__(self):
        Geometry(mpp=self.mpp, global_px=self.global_px, spot_px=self.spot_px, bin_px=self.bin_px)
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if min(self.min_bins_per_tile, self.samples_per_shard, self.bytes_per_shard) < 1:
            raise ValueError("min_bins_per_tile, samples_per_shard and bytes_per_shard must be >= 1")
        if self.max_bins_per_sample < 0 or self.k_neighbours < 0:
            raise ValueError("max_bins_per_sample and k_neighbours must be >= 0")

    def geometry(self) -> Geometry:
        return Geometry(mpp=self.mpp, global_px=self.global_px, spot_px=self.spot_px, bin_px=self.bin_px)


@dataclasses.dataclass(kw_only=True)
class GeneConfig:
    """One gene list per cohort, chosen on the training slides, and the normalisation."""

    selection: Literal["top_mean", "hvg", "file"] = "top_mean"
    n_genes: int = 250  # paper: top 250 by mean expression
    gene_file: str | None = None  # selection=file: one gene name or id per line
    selection_bin_um: int = 16  # bin size whose matrices rank the genes (same list for every bin size)
    normalisation: Literal["log1p_libsize", "log1p", "none"] = "log1p_libsize"
    # log1p_libsize: log1p(counts / library size * target_sum), library size over ALL genes of the
    # bin (spot / global: of the summed counts); 10,000 is the scanpy / Seurat convention.
    target_sum: float = 10000.0

    def __post_init__(self):
        if self.n_genes < 1 or self.target_sum <= 0:
            raise ValueError("n_genes must be >= 1 and target_sum > 0")
        if self.selection == "file" and not self.gene_file:
            raise ValueError("selection=file needs genes.gene_file")


@dataclasses.dataclass(kw_only=True)
class EncoderConfig:
    """Frozen encoder for spot and global features (computed once here, stop-grad in the model)."""

    name: str = "regnetx_002"  # 6.5 ms per 224 px crop on one CPU core (fp32), 368 features (resnet18: 53 ms, 512)
    # local checkpoint, timm:NAME / hf-hub:ORG/NAME, None = random (seed), or a trained MagNet model (models:/NAME@ALIAS
    # or runs:/ID/model in tracking_uri, or a model folder): its bin encoder, frozen (sharding/tuned_encoder.py);
    # the encoder's name then comes from the model
    weights: str | None = None
    tracking_uri: str | None = None  # for weights=models:/...: else $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # timm.create_model arguments
    input_px: int = 224  # the 512 px global tile is resized to this before the encoder (0 = native)
    # fp32, or bf16 autocast: features 1.5x faster on a CPU core with AVX512-BF16, slower on CPUs without it
    # (GPUs: bench/bench_gpu.py); the features differ from fp32 ones at bf16 rounding. Recorded in the manifest
    # and used again by magnet predict, so a model meets the same features in training and prediction.
    precision: Literal["fp32", "bf16"] = "fp32"
    # images per encoder call on the CPU (a GPU takes a block of tiles at once); regnetx_002 at 224 px, one core,
    # ms per image: 7.0 / 6.7 / 8.3 / 10.6 in calls of 4 / 8 / 16 / 32 (small calls keep activations in cache)
    batch_size: int = 8
    # also store each bin's feature (bin_feat.npy.zst): the encoder on the bin patch (shard.bin_px, cut from the
    # stored tile image as the end-to-end model cuts it), resized to bin_input_px (0 = as cut); model.bin_input
    bin_features: bool = False
    bin_input_px: int = 0
    # also store each bin's feature field (bin_field.npy.zst, sharding/feature_field.py): the mean of the cached bin
    # features of the slide's bins around it, Gaussian-weighted with each of these standard deviations (um); the
    # tissue around a bin at several scales, beyond the tiles a sample holds (model.field reads it)
    field_sd_um: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.batch_size < 1 or self.input_px < 0 or self.bin_input_px < 0:
            raise ValueError("batch_size must be >= 1, input_px and bin_input_px >= 0")
        if self.field_sd_um and not self.bin_features:
            raise ValueError("field_sd_um smooths the cached bin features: set bin_features=true")
        if any(sd <= 0 for sd in self.field_sd_um):
            raise ValueError(f"field_sd_um must be positive, got {self.field_sd_um}")


@dataclasses.dataclass(kw_only=True)
class SplitConfig:
    """Slide-level (patient-level when the samplesheet has a patient column) splits and folds."""

    val_frac: float = 0.2
    test_frac: float = 0.2
    n_folds: int = 5

    def __post_init__(self):
        if self.val_frac < 0 or self.test_frac < 0 or self.val_frac + self.test_frac >= 1:
            raise ValueError("need val_frac, test_frac >= 0 and val_frac + test_frac < 1")
        if self.n_folds < 1:
            raise ValueError("n_folds must be >= 1")


@dataclasses.dataclass(kw_only=True)
class RayConfig:
    """Workers: one per ``cpus_per_task`` local cores, and per ``gpus_per_task`` GPUs when the frozen encoder
    runs on GPUs (a single worker, for one slide or one core, runs in the command's own process without Ray),
    and Ray's object store; ``num_cpus`` and the store are ignored on a cluster."""

    num_cpus: int = 0  # 0 = all cores of this machine
    cpus_per_task: int = 1  # cores of each worker, also its torch threads
    # where the frozen encoder runs: auto = on a GPU when the worker has one (a Ray worker takes gpus_per_task of
    # a GPU when the cluster has GPUs), else the CPU; features differ between the two at fp32 rounding only
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_task: float = 1.0
    object_store_mb: int = 256
    progress: bool = True

    def __post_init__(self):
        if self.num_cpus < 0 or self.cpus_per_task < 1 or not self.gpus_per_task > 0:
            raise ValueError("need num_cpus >= 0, cpus_per_task >= 1 and gpus_per_task > 0")


@dataclasses.dataclass(kw_only=True)
class ShardConfig:
    seed: int = 0
    shard: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    genes: GeneConfig = dataclasses.field(default_factory=GeneConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    split: SplitConfig = dataclasses.field(default_factory=SplitConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

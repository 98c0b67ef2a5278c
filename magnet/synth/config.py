"""Typed configuration of the synthetic Visium HD generator (``magnet synth``)."""

from __future__ import annotations

import dataclasses
from typing import Literal


def _positive(section: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{section}{name}: must be > 0, got {value}")


@dataclasses.dataclass(kw_only=True)
class TissueConfig:
    """Tissue architecture: compartments drawn from smooth random fields, then cells in them."""

    field_res_um: float = 4.0  # resolution of the compartment fields
    tissue_fraction: float = 0.7  # share of the slide covered by tissue (irregular mask)
    tumour_fraction: float = 0.35  # share of tissue in tumour nests
    immune_fraction: float = 0.08  # share of tissue in immune aggregates
    vessel_fraction: float = 0.06  # share of tissue in vessels (wall and lumen)
    nest_scale_um: float = 60.0  # correlation length of the tumour-nest field
    cell_spacing_um: float = 5.0  # candidate lattice; densities thin it per compartment

    def __post_init__(self):
        _positive("tissue.", field_res_um=self.field_res_um, nest_scale_um=self.nest_scale_um,
                  cell_spacing_um=self.cell_spacing_um)
        for name in ("tissue_fraction", "tumour_fraction", "immune_fraction", "vessel_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"tissue.{name}: must be in (0, 1), got {getattr(self, name)}")


@dataclasses.dataclass(kw_only=True)
class ExpressionConfig:
    """Gene programs (shared by the cohort) and counting (per slide)."""

    n_genes: int = 320
    markers_per_type: int = 20
    genes_per_context_program: int = 12
    umis_per_cell: float = 200.0  # mean over cell types before the per-slide effect
    context_radius_um: float = 75.0  # neighbourhood that drives the context programs
    diffusion_um: float = 1.0  # transcripts scatter around their cell by cell size and this
    slide_effect_sd: float = 0.25  # log-scale sd of the per-slide library size factor
    gene_batch_sd: float = 0.15  # log-scale sd of the per-slide, per-gene effect
    # range programs (the context benchmark, configs/synth/context.yaml; none by default): every expressing
    # cell type responds alike, so the bin's own cells say little about them
    short_range_genes: int = 0  # driven by the distance to the tumour-stroma interface (group context_short)
    short_range_um: list[float] = dataclasses.field(default_factory=lambda: [15.0, 60.0])  # full .. no activity
    long_range_genes: int = 0  # driven by the immune-aggregate share of the tissue around (group context_long)
    long_range_sd_um: float = 100.0  # Gaussian kernel of that share, truncated at 3 sd (so 100-300 um)
    long_range_ramp: list[float] = dataclasses.field(default_factory=lambda: [0.03, 0.15])  # share: no .. full
    range_lfc: list[float] = dataclasses.field(default_factory=lambda: [1.5, 2.5])  # log fold change range

    def __post_init__(self):
        if self.n_genes < 300:
            raise ValueError(f"expression.n_genes: must be >= 300, got {self.n_genes}")
        _positive("expression.", markers_per_type=self.markers_per_type,
                  genes_per_context_program=self.genes_per_context_program,
                  umis_per_cell=self.umis_per_cell, context_radius_um=self.context_radius_um,
                  diffusion_um=self.diffusion_um, long_range_sd_um=self.long_range_sd_um)
        for name in ("short_range_genes", "long_range_genes"):
            if getattr(self, name) < 0:
                raise ValueError(f"expression.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("short_range_um", "long_range_ramp", "range_lfc"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1]:
                raise ValueError(f"expression.{name}: must be two increasing values >= 0, got {lo_hi}")


@dataclasses.dataclass(kw_only=True)
class SynthConfig:
    """A cohort of synthetic slides in the Space Ranger HD layout (``magnet synth``)."""

    slides: int = 3
    size_um: float = 1000.0  # side of the square scanned area
    mpp: float = 0.5  # full-resolution microns per pixel
    seed: int = 0  # cohort seed: programs from it, each slide its own stream
    tile_px: int = 256  # TIFF tile side; also the height of the rendering row blocks
    image_compression: Literal["jpeg", "zlib", "none"] = "jpeg"
    jpeg_quality: int = 90
    tissue: TissueConfig = dataclasses.field(default_factory=TissueConfig)
    expression: ExpressionConfig = dataclasses.field(default_factory=ExpressionConfig)

    def __post_init__(self):
        _positive("", slides=self.slides, size_um=self.size_um, mpp=self.mpp)
        if self.tile_px < 16 or self.tile_px % 16:
            raise ValueError(f"tile_px: must be a multiple of 16, got {self.tile_px}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality: must be in [1, 100], got {self.jpeg_quality}")
        if self.size_um < 64:
            raise ValueError(f"size_um: must be >= 64 (room for 16 um bins and the registration), got {self.size_um}")
        if self.size_um / self.mpp > 200_000:
            raise ValueError(f"size_um/mpp: image side of {self.size_um / self.mpp:.0f} px is too large")

"""Baselines trained by the same loop: a mean-profile predictor and an ST-Net-style encoder + linear head."""

from __future__ import annotations

import torch
from torch import nn

from magnet.models.config import ModelConfig
from magnet.models.bin_input import bin_input_modules, embed_bins
from magnet.models.predictions import Predictions
from magnet.models.register import register_model


class MeanProfile(nn.Module):
    """One learnable per-gene profile per level, the same for every node.

    Trained by the ordinary loop, its MSE term drives each profile to the training mean of that
    level (exactly, with MSE alone; the PCC terms only shape it across genes). A constant predictor:
    high PCC per bin across genes, zero PCC per gene across bins.
    """

    def __init__(self, n_genes: int):
        super().__init__()
        # not constant at init: the gradient of a PCC term grows as 1 / (spread of the profile)
        self.bin = nn.Parameter(0.1 * torch.randn(n_genes))
        self.spot = nn.Parameter(0.1 * torch.randn(n_genes))
        self.glob = nn.Parameter(0.1 * torch.randn(n_genes))

    def output_biases(self) -> list[nn.Parameter]:
        return [self.bin, self.spot, self.glob]

    def forward(self, batch) -> Predictions:
        # repeat, not expand: a view of a parameter requires grad even under no_grad (then .numpy() fails)
        return Predictions(
            bin=self.bin.repeat(batch.bin_expr.shape[0], 1),
            spot=self.spot.repeat(batch.spot_expr.shape[0], 1),
            glob=self.glob.repeat(batch.glob_expr.shape[0], 1),
        )


class STNet(nn.Module):
    """Single scale (He et al. 2020 style): the bin patch through the encoder, a linear head; no context. With
    ``model.bin_input=features``: a linear head on the bin's cached frozen feature (a linear probe)."""

    def __init__(self, cfg: ModelConfig, n_genes: int, feat_dim: int):
        super().__init__()
        self.encoder, self.bin_scale, n_local = bin_input_modules(cfg, feat_dim)
        self.head = nn.Linear(n_local, n_genes)

    def output_biases(self) -> list[nn.Parameter]:
        return [self.head.bias]

    def forward(self, batch) -> Predictions:
        return Predictions(bin=self.head(embed_bins(self.encoder, self.bin_scale, batch)))


@register_model("stnet")
def stnet(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry) -> STNet:
    return STNet(cfg, n_genes, feat_dim)


@register_model("mean")
def mean(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry) -> MeanProfile:
    return MeanProfile(n_genes)

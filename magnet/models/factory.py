"""Build any model by name (``ModelConfig.name``) with the same inputs and outputs."""

from __future__ import annotations

from torch import nn

from magnet.geometry import Geometry
from magnet.models.config import MODEL_NAMES, ModelConfig


def create_model(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> nn.Module:
    """``model(batch: magnet.batch.Batch) -> magnet.models.predictions.Predictions``.

    ``n_genes`` and ``feat_dim`` (frozen feature size) come from the shard manifest; ``geometry``
    (pixel size and tile sides) scales positions. Names: ``magnet``, ``magnet_no_spot``,
    ``magnet_no_global``, ``magnet_no_graph``, ``magnet_paper``, ``stnet``, ``mean``.
    """
    from magnet.models.baselines import MeanProfile, STNet
    from magnet.models.magnet import MagNet

    ablations = {
        "magnet": {},
        "magnet_no_spot": {"spot": False},
        "magnet_no_global": {"glob": False},
        "magnet_no_graph": {"graph": False},
        "magnet_paper": {"paper": True},
    }
    if cfg.name in ablations:
        return MagNet(cfg, n_genes, feat_dim, geometry, **ablations[cfg.name])
    if cfg.name == "stnet":
        return STNet(cfg, n_genes)
    if cfg.name == "mean":
        return MeanProfile(n_genes)
    raise ValueError(f"unknown model name {cfg.name!r}; known: {', '.join(MODEL_NAMES)}")

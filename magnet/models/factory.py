"""Build any model by name (``ModelConfig.name``) with the same inputs and outputs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from magnet.geometry import Geometry
from magnet.models.config import ModelConfig
from magnet.models.register import MODEL_NAMES, MODELS

if TYPE_CHECKING:  # torch loads with the model's module, not with this one
    from torch import nn


def model_names() -> tuple[str, ...]:
    return tuple(MODEL_NAMES)


def create_model(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> nn.Module:
    """``model(batch: magnet.batch.Batch) -> magnet.models.predictions.Predictions``.

    ``n_genes`` and ``feat_dim`` (frozen feature size) come from the shard manifest; ``geometry``
    (pixel size and tile sides) scales positions. Names: :func:`model_names`.
    """
    if cfg.name not in MODEL_NAMES:
        raise ValueError(f"unknown model name {cfg.name!r}; known: {', '.join(MODEL_NAMES)}")
    importlib.import_module(MODEL_NAMES[cfg.name])  # the module registers its builders as it loads
    return MODELS[cfg.name](cfg, n_genes, feat_dim, geometry)

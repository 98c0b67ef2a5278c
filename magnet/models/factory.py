"""Build any model by name (``ModelConfig.name``) with the same inputs and outputs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from magnet.models.register import MODELS

if TYPE_CHECKING:  # ModelConfig checks its name here: a run-time import would be a cycle
    from torch import nn

    from magnet.geometry import Geometry
    from magnet.models.config import ModelConfig

# where models register themselves
MODEL_MODULES = ("magnet.models.magnet", "magnet.models.baselines", "magnet.models.ridge")


def model_names() -> tuple[str, ...]:
    for module in MODEL_MODULES:
        importlib.import_module(module)
    return tuple(MODELS)


def create_model(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry: Geometry) -> nn.Module:
    """``model(batch: magnet.batch.Batch) -> magnet.models.predictions.Predictions``.

    ``n_genes`` and ``feat_dim`` (frozen feature size) come from the shard manifest; ``geometry``
    (pixel size and tile sides) scales positions. Names: :func:`model_names`.
    """
    names = model_names()
    if cfg.name not in MODELS:
        raise ValueError(f"unknown model name {cfg.name!r}; known: {', '.join(names)}")
    return MODELS[cfg.name](cfg, n_genes, feat_dim, geometry)

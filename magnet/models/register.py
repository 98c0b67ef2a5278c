"""The model registry: the table of model names (and the module that defines each), read without importing
torch, and ``@register_model``, with which each model registers its builder where it is defined.

A config is checked against :data:`MODEL_NAMES` (:class:`magnet.models.config.ModelConfig`), so loading one
needs no torch; building a model imports its module (:func:`magnet.models.factory.create_model`).
"""

from __future__ import annotations

from collections.abc import Callable

# name -> the module whose @register_model defines it; a decorator naming another module or name fails
MODEL_NAMES: dict[str, str] = {
    "magnet": "magnet.models.magnet",
    "magnet_no_spot": "magnet.models.magnet",
    "magnet_no_global": "magnet.models.magnet",
    "magnet_no_graph": "magnet.models.magnet",
    "magnet_paper": "magnet.models.magnet",
    "stnet": "magnet.models.baselines",
    "mean": "magnet.models.baselines",
    "ridge": "magnet.models.ridge",
}

# name -> builder(cfg: ModelConfig, n_genes, feat_dim, geometry) -> nn.Module, filled as modules import
MODELS: dict[str, Callable] = {}


def register_model(name: str) -> Callable[[Callable], Callable]:
    def add(builder: Callable) -> Callable:
        if MODEL_NAMES.get(name) != builder.__module__:
            raise ValueError(f"model {name!r} ({builder.__module__}) is not in MODEL_NAMES "
                             f"(magnet/models/register.py) under its module")
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = builder
        return builder
    return add

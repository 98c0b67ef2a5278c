"""The model registry: each model registers its builder where it is defined (``@register_model``)."""

from __future__ import annotations

from collections.abc import Callable

# name -> builder(cfg: ModelConfig, n_genes, feat_dim, geometry) -> nn.Module
MODELS: dict[str, Callable] = {}


def register_model(name: str) -> Callable[[Callable], Callable]:
    def add(builder: Callable) -> Callable:
        if name in MODELS:
            raise ValueError(f"model {name!r} registered twice")
        MODELS[name] = builder
        return builder
    return add

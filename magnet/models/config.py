"""ModelConfig: which model to build (by name) and its sizes. Loaded with ``magnet.config.load_config``."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from magnet.models.register import MODEL_NAMES


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """Model section (``model.*``). Defaults are the paper's sizes (ResNet-50, width 1024, 8 heads).

    ``k_bin``, ``k_spot`` and ``k_global`` are used by :func:`magnet.batch.collate` (graph degree per
    level) and fix the number of cross-attention context tokens (``1 + k`` per level).
    """

    name: str = "magnet"  # a registered model (magnet.models.register.MODEL_NAMES)
    # the bin level's input (magnet/models/bin_input.py): image = the bin patch through model.encoder, trained end to
    # end; features = the shards' cached frozen feature of the patch (encoder.bin_features), no image, no CNN
    bin_input: Literal["image", "features"] = "image"
    # MagNet and ridge: also read the bins' feature field at this many scales (member bin_field, the shards'
    # encoder.field_sd_um; 0 = not read): the mean of the cached bin features around the bin, MagNet adds its
    # projection to the bin embedding, on the context path
    field: int = 0
    encoder: str = "resnet50"  # any timm model name
    encoder_weights: str | None = None  # None (random, seeded), a local checkpoint path, or hub name
    encoder_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)  # timm.create_model arguments
    seed: int = 0  # init seed of the encoder when encoder_weights is None
    channels_last: bool = True
    width: int = 1024
    heads: int = 8
    gat_type: Literal["gat", "gatv2"] = "gat"
    gat_layers: int = 3  # stacked graph-attention blocks per level
    transformer_layers: int = 1  # per level, over the block outputs (the reference shares 3 over 3 levels)
    k_bin: int = 8
    k_spot: int = 8
    k_global: int = 8
    dropout: float = 0.1
    context_drop: float = 0.5  # MagNet: share of training bins predicted by the local read-out alone (magnet.py)
    edge_features: bool = True  # relative offsets (um, scaled per level) as GAT edge features
    init_from_data: bool = True  # outputs start at the training mean, frozen features standardised (models/init.py)
    # name=ridge (magnet/models/ridge.py): PCA dims, ridge alpha (0 = chosen on data.eval_split), bins fitted on
    ridge_dims: int = 256
    ridge_alpha: float = 0.0
    ridge_max_bins: int = 200_000

    def __post_init__(self):
        if self.name not in MODEL_NAMES:
            raise ValueError(f"name must be one of {list(MODEL_NAMES)}, got {self.name!r}")
        if self.width <= 0 or self.heads <= 0 or self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a positive multiple of heads ({self.heads})")
        for key in ("gat_layers", "transformer_layers", "k_bin", "k_spot", "k_global"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.field < 0 or (self.field and self.bin_input != "features"):
            raise ValueError(f"field ({self.field}) reads the cached bin features' field: needs bin_input=features")
        if self.field and not (self.name.startswith("magnet") or self.name == "ridge"):
            raise ValueError(f"field: MagNet and the ridge probe read the bin features' field, {self.name} does not")
        if self.name == "ridge" and self.bin_input != "features":
            raise ValueError("name=ridge fits on cached bin features: set model.bin_input=features")
        if self.ridge_dims < 1 or self.ridge_alpha < 0 or self.ridge_max_bins < 2:
            raise ValueError("need ridge_dims >= 1, ridge_alpha >= 0 and ridge_max_bins >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.context_drop < 1.0:
            raise ValueError(f"context_drop must be in [0, 1), got {self.context_drop}")

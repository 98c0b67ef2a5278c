"""The bin level's input, for every model (``model.bin_input``): ``image``, the bin patch through the timm encoder
trained end to end (:class:`~magnet.models.encoder.Encoder`, ``model.encoder``); or ``features``, the frozen
encoder's cached feature of the patch (member ``bin_feat``, computed by the sharding stage and by ``magnet
predict`` with the shards' encoder), standardised with the training split's statistics. Everything above it
(cross-attention, graphs, fusion, heads) is the same in both regimes."""

from __future__ import annotations

import torch
from torch import nn

from magnet.errors import UserError
from magnet.models.encoder import Encoder
from magnet.models.init import FeatureScaler


def bin_input_modules(cfg, feat_dim: int) -> tuple[Encoder | None, FeatureScaler | None, int]:
    """(trainable encoder or None, feature scaler or None, size of the bin embedding) for ``cfg`` (ModelConfig)."""
    if cfg.bin_input == "features":
        return None, FeatureScaler(feat_dim), feat_dim
    enc = Encoder(cfg.encoder, cfg.encoder_weights, seed=cfg.seed, channels_last=cfg.channels_last,
                  kwargs=cfg.encoder_kwargs)
    return enc, None, enc.num_features


def embed_bins(encoder: Encoder | None, scaler: FeatureScaler | None, batch) -> torch.Tensor:
    """(Nb, D) bin embedding of ``batch`` (:class:`magnet.batch.Batch`)."""
    if encoder is not None:
        if batch.bin_img is None:
            raise UserError("batch: bin_img: missing (model.bin_input=image needs the tile images)")
        return encoder(batch.bin_img)
    if batch.bin_feat is None:
        raise UserError("batch: bin_feat: missing (model.bin_input=features needs shards with encoder.bin_features)")
    return scaler(batch.bin_feat.detach())  # frozen: stop-grad


def field_input(batch) -> torch.Tensor:
    """(Nb, L * F) the bins' feature field (member ``bin_field``, ``model.field``), frozen: stop-grad."""
    if batch.bin_field is None:
        raise UserError("batch: bin_field: missing (model.field needs shards with encoder.field_sd_um)")
    return batch.bin_field.detach()

"""Cached bin features (``encoder.bin_features``): each bin's frozen-encoder feature stored with its sample
(member ``bin_feat``), so ``model.bin_input=features`` trains without decoding images or running a CNN.

The feature is computed from the tile image as stored (decoded from its shard bytes), at the bin positions of
the sample, so the sharding stage and ``magnet predict`` give the model the same numbers, and the patches are
those the end-to-end model would see."""

from __future__ import annotations

import numpy as np

from magnet.format.codec import decode_image
from magnet.format.sample import Sample


def bin_features(extractor, encoded_image: bytes, bin_xy) -> np.ndarray:
    """(n, F) float16 from ``extractor`` (a :class:`~sharding.features.FeatureExtractor`) on the bin patches at
    ``bin_xy`` (tile-local px) of ``encoded_image`` (the sample's stored tile image)."""
    return extractor.bins(decode_image(encoded_image), bin_xy)


def with_bin_features(sample: Sample, extractor, encoded_image: bytes) -> Sample:
    """``sample`` with ``bin_feat`` (:func:`bin_features` at its bins)."""
    return sample.replace(bin_feat=bin_features(extractor, encoded_image, sample["bin_xy"]))


def encoder_record(cfg, feat_dim: int, weights_id: str, weights_source: str | None = None) -> dict:
    """The manifest's ``encoder``: what computed every frozen feature of the shards (``cfg``: EncoderConfig);
    ``weights_source``: the trained model whose bin encoder it is (sharding/tuned_encoder.py)."""
    rec = {"name": cfg.name, "feat_dim": feat_dim, "weights": weights_id, "input_px": cfg.input_px,
           "precision": cfg.precision, "bin_features": cfg.bin_features}
    if weights_source:
        rec["weights_source"] = weights_source
    if cfg.kwargs:
        rec["kwargs"] = dict(cfg.kwargs)
    if cfg.bin_features:
        rec["bin_input_px"] = cfg.bin_input_px
    if cfg.field_sd_um:
        rec["field_sd_um"] = [float(v) for v in cfg.field_sd_um]
    return rec

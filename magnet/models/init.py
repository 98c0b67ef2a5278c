"""Initialisation from statistics of the training split: output biases and frozen-feature scaling.

Two things a model cannot learn quickly from its default initialisation, measured on the demo:

- **Output offset.** The targets (log1p of library-size-normalised counts) have a per-gene mean of
  about 3 while the heads start near 0; with Adam a bias moves by about ``lr`` per step, so for
  hundreds of steps the MSE term is dominated by that offset (worst behind MagNet's LayerNorm
  heads, which reach it through their bias only). Every expression output therefore starts at the
  per-gene training mean (each model's ``output_biases()``): MagNet's local read-out and spot and
  global heads (its context head starts at zero), ST-Net's head, the mean profile's vectors.
- **Frozen-feature scale.** The spot and global tile features come from a frozen encoder; with
  random weights (no pretrained weights reachable) they vary across tiles by about 0.01 per
  dimension (before sharding centred them on the slide, around a common vector of about 0.07), so
  MagNet's node projections see near-constant inputs. MagNet standardises them per dimension with
  the training split's mean and sd (buffers saved with the model, like an encoder's input
  mean/std). Demo, 16 um, 150 steps: the spot head's validation PCC per gene 0.017 -> 0.258, the
  global head's 0.004 -> 0.205.

Statistics come from the training split only (each training shard's first samples), so every rank
computes the same values; a resumed run skips this and loads the checkpoint's.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn

from magnet.errors import UserError
from magnet.models.counts import CountModel, log_rate_of


def training_statistics(shard_set, split: str, on_corrupt: str = "fail",
                        max_samples: int = 512) -> dict[str, torch.Tensor]:
    """Per-gene mean of the bin targets and per-dimension mean/sd of the centre tiles' spot and global
    features, over every ``split`` shard's first samples (``max_samples`` in all), read through the
    checked reader under ``on_corrupt`` (``data.on_corrupt``) like the training stream."""
    shards = shard_set.shards(split)
    reader = shard_set.reader(on_corrupt)
    per_shard = max(1, max_samples // max(len(shards), 1))
    expr_sum, n_bins, spot, glob, bins, fields = 0.0, 0, [], [], [], []
    count_sum, lib_sum, log_lib_sum = 0.0, 0.0, 0.0
    for url, _ in shards:
        for s in itertools.islice(reader.read([url]), per_shard):
            expr_sum = expr_sum + s["bin_expr"].astype(np.float64).sum(0)
            n_bins += len(s["bin_expr"])
            if "bin_counts" in s and "bin_libsize" in s:
                count_sum = count_sum + s["bin_counts"].astype(np.float64).sum(0)
                lib_sum += float(s["bin_libsize"].astype(np.float64).sum())
                log_lib_sum += float(np.log1p(s["bin_libsize"].astype(np.float64)).sum())
            spot.append(s["spot_feat"][0][s["spot_mask"][0]].astype(np.float64))
            glob.append(s["global_feat"][:1].astype(np.float64))
            if "bin_feat" in s:
                bins.append(s["bin_feat"].astype(np.float64))
            if "bin_field" in s:
                fields.append(s["bin_field"].reshape(len(s["bin_field"]), -1).astype(np.float64))
    if not glob:
        raise UserError(f"{shard_set.manifest.path}: shards: no readable sample of split '{split}' for the training "
                        f"statistics (data.on_corrupt={on_corrupt} skipped them all)")
    spot_f, glob_f = np.concatenate(spot), np.concatenate(glob)
    stats = {"gene_mean": expr_sum / max(n_bins, 1), "spot_mean": spot_f.mean(0), "spot_sd": spot_f.std(0),
             "glob_mean": glob_f.mean(0), "glob_sd": glob_f.std(0)}
    if bins:  # cached bin features (model.bin_input=features)
        bin_f = np.concatenate(bins)
        stats.update(bin_mean=bin_f.mean(0), bin_sd=bin_f.std(0))
    if fields:  # their field (model.field), scaled by one sd for all dimensions: smoothing shrinks the noisy
        # dimensions most, and a per-dimension sd would blow them up again (validation, 16 um: +0.005 per-gene PCC)
        field_f = np.concatenate(fields)
        stats.update(field_mean=field_f.mean(0), field_sd=np.full(field_f.shape[1], field_f.std(0).mean()))
    if lib_sum > 0:  # count models start at the pooled rate per unit exposure (genes never seen: 1e-8)
        stats["log_rate"] = np.log(np.maximum(count_sum / lib_sum, 1e-8))
        stats["log_libsize"] = np.array([log_lib_sum / max(n_bins, 1)])
    return {k: torch.from_numpy(np.asarray(v)).float() for k, v in stats.items()}


def init_from_statistics(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Every expression output starts at the training mean; MagNet's feature scalers take the feature
    statistics (a count model's outputs: the pooled log-rate). Each model names its offsets (``output_biases()``);
    ST-Net has no scalers."""
    mean = stats["gene_mean"]
    if isinstance(model, CountModel):  # outputs log-rates (and the bins' log1p library size)
        mean = stats["log_rate"] if "log_rate" in stats else log_rate_of(mean, model.target_sum)
        if model.libsize:
            mean = torch.cat([mean, stats["log_libsize"]])
    with torch.no_grad():
        for p in model.output_biases():
            p.add_(mean.to(p.dtype))
    for name, scaler in getattr(model, "feat_scale", {}).items():
        scaler.set(stats[f"{name}_mean"], stats[f"{name}_sd"])
    if getattr(model, "bin_scale", None) is not None:
        model.bin_scale.set(stats["bin_mean"], stats["bin_sd"])


class FeatureScaler(nn.Module):
    """``(x - mean) / sd`` per dimension with fixed buffers (saved with the model); sd floored at ``eps``
    so that dimensions constant over the training tiles (dead ReLU units) stay 0, not inf."""

    def __init__(self, dim: int, eps: float = 1e-3):
        super().__init__()
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))

    def set(self, mean: torch.Tensor, sd: torch.Tensor) -> None:
        with torch.no_grad():
            self.mean.copy_(mean)
            self.sd.copy_(sd.clamp_min(self.eps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.sd

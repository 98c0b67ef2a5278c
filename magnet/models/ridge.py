"""The field's standard probe (HEST-Benchmark, Jaume et al. 2024): PCA of the frozen bin features, then ridge
regression to every gene, in closed form (``model.name=ridge``, ``model.bin_input=features``).

It goes through the same entry point as every model (``launch/train.py``, ``magnet train``, sweeps and
``launch/experiment.py`` replicates, registry, ``magnet predict`` / ``evaluate``), but it is fitted, not trained:
the training loop calls :meth:`RidgeProbe.fit` once where the other models take their training statistics
(``model.fitted``), then takes no SGD step and evaluates it once.

Protocol: the features of the training split's bins (up to ``model.ridge_max_bins``, a seeded subsample) are
centred and projected on their first ``model.ridge_dims`` principal components (256 as in HEST-Benchmark, fewer
when there are fewer features or bins), each component scaled to unit variance, so the ridge penalty is
scale-free: ``W = (Z'Z/n + alpha I)^-1 Z'(Y - mean Y)/n`` shrinks component j's coefficient by
``1 / (1 + alpha)``. ``model.ridge_alpha`` > 0 fixes alpha; 0 (default) picks it from :data:`ALPHAS` by the
mean squared error on the evaluation split (``data.eval_split``, the validation slides), else uses 1.0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from magnet.errors import UserError
from magnet.models.config import ModelConfig
from magnet.models.predictions import Predictions
from magnet.models.register import register_model

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
DEFAULT_ALPHA = 1.0  # without an evaluation split


def fit_pca(x: np.ndarray, k: int, eps: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """(mean (F,), projection (F, k)): centred ``x`` (n, F) onto its first ``k`` principal components, each scaled
    to unit variance (components of no variance get a zero column)."""
    mean = x.mean(0)
    xc = x - mean
    cov = xc.T @ xc / max(len(x), 1)
    val, vec = np.linalg.eigh(cov)
    order = np.argsort(val)[::-1][:k]
    val, vec = val[order], vec[:, order]
    scale = np.where(val > eps * max(val.max(initial=0.0), eps), 1.0 / np.sqrt(np.maximum(val, eps)), 0.0)
    proj = np.zeros((x.shape[1], k))
    proj[:, :len(order)] = vec * scale
    return mean, proj


def fit_ridge(z: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(weight (k, G), bias (G,)) minimising ``|y - z W - b|^2 / n + alpha |W|^2``."""
    zm, ym = z.mean(0), y.mean(0)
    zc, yc = z - zm, y - ym
    n = max(len(z), 1)
    w = np.linalg.solve(zc.T @ zc / n + alpha * np.eye(z.shape[1]), zc.T @ yc / n)
    return w, ym - zm @ w


def inputs(bin_feat, bin_field, field: bool):
    """The probe's input: the bin's feature, with its field at every scale beside it when ``field`` (model.field)."""
    if not field:
        return bin_feat
    lib = torch if isinstance(bin_feat, torch.Tensor) else np
    return lib.concatenate([bin_feat, bin_field.reshape(len(bin_field), -1)], 1)


def _bins(shard_set, split: str, on_corrupt: str, cap: int, seed: int,
          field: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(features, targets) float64 of ``split``'s bins, at most ``cap`` (a seeded subsample)."""
    feats, exprs = [], []
    for s in shard_set.reader(on_corrupt).read(u for u, _ in shard_set.shards(split)):
        feats.append(inputs(s["bin_feat"], s.arrays.get("bin_field"), field))
        exprs.append(s["bin_expr"])
    if not feats:
        raise UserError(f"{shard_set.manifest.path}: shards: no readable sample of split '{split}' to fit the ridge "
                        f"probe")
    x, y = np.concatenate(feats).astype(np.float64), np.concatenate(exprs).astype(np.float64)
    if len(x) > cap:
        keep = np.sort(np.random.default_rng(seed).choice(len(x), cap, replace=False))
        x, y = x[keep], y[keep]
    return x, y


class RidgeProbe(nn.Module):
    """``bin_feat`` (and ``bin_field`` with ``model.field``) -> PCA (buffers) -> linear map to the genes (parameters
    set by :meth:`fit`); bin level only."""

    fitted = True  # the training loop fits it (fit) and takes no SGD step

    def __init__(self, cfg: ModelConfig, n_genes: int, feat_dim: int):
        super().__init__()
        self.cfg = cfg
        feat_dim *= 1 + cfg.field
        k = min(cfg.ridge_dims, feat_dim)
        self.register_buffer("mean", torch.zeros(feat_dim))
        self.register_buffer("proj", torch.zeros(feat_dim, k))
        self.register_buffer("alpha", torch.zeros(()))
        self.weight = nn.Parameter(torch.zeros(k, n_genes))
        self.bias = nn.Parameter(torch.zeros(n_genes))

    def output_biases(self) -> list[nn.Parameter]:
        return []  # the fit sets the intercept

    def fit(self, shard_set, data) -> dict:
        """Fit on ``data.train_split`` (alpha on ``data.eval_split`` when ``ridge_alpha`` is 0 and it exists)."""
        cfg = self.cfg
        x, y = _bins(shard_set, data.train_split, data.on_corrupt, cfg.ridge_max_bins, cfg.seed, cfg.field > 0)
        k = self.proj.shape[1]
        mean, proj = fit_pca(x, min(k, max(len(x) - 1, 1)))
        z = (x - mean) @ proj
        alpha, scores = cfg.ridge_alpha, {}
        if not alpha and shard_set.manifest.has_split(data.eval_split):
            xv, yv = _bins(shard_set, data.eval_split, data.on_corrupt, cfg.ridge_max_bins, cfg.seed, cfg.field > 0)
            zv = (xv - mean) @ proj
            for a in ALPHAS:
                w, b = fit_ridge(z, y, a)
                scores[a] = float(((zv @ w + b - yv) ** 2).mean())
            alpha = min(scores, key=scores.get)
        alpha = alpha or DEFAULT_ALPHA
        w, b = fit_ridge(z, y, alpha)
        pad = np.zeros((k, w.shape[1]))
        pad[:w.shape[0]] = w
        with torch.no_grad():
            self.mean.copy_(torch.from_numpy(mean))
            self.proj.zero_()
            self.proj[:, :proj.shape[1]] = torch.from_numpy(proj)
            self.alpha.fill_(alpha)
            self.weight.copy_(torch.from_numpy(pad))
            self.bias.copy_(torch.from_numpy(b))
        return {"alpha": alpha, "dims": proj.shape[1], "bins": len(x), "val_mse": scores}

    def forward(self, batch) -> Predictions:
        if batch.bin_feat is None:
            raise UserError("batch: bin_feat: missing (model.name=ridge needs shards with encoder.bin_features)")
        if self.cfg.field and batch.bin_field is None:  # the check of field_input (models/bin_input.py): no timm here
            raise UserError("batch: bin_field: missing (model.field needs shards with encoder.field_sd_um)")
        z = (inputs(batch.bin_feat.float(), batch.bin_field, self.cfg.field > 0) - self.mean) @ self.proj
        return Predictions(bin=z @ self.weight + self.bias)


@register_model("ridge")
def ridge(cfg: ModelConfig, n_genes: int, feat_dim: int, geometry) -> RidgeProbe:
    return RidgeProbe(cfg, n_genes, feat_dim)

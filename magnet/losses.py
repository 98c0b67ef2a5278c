"""MagNet's training loss: weighted MSE and (1 - PCC) terms per level plus cross-level consistency.

Defaults are the paper's: ``0.75 MSE + 0.1 (1 - PCC)`` at bin level, ``0.05 (1 - PCC)`` at spot and
at global level, ``0.05`` consistency. PCC here is per row across genes (the paper's protocol).

Consistency (``consistency_form``):

- ``"aggregate"`` (default): for every spot (global) node holding bins of the batch, the mean of
  its bins' predictions against the node's own prediction, as ``1 - PCC`` across genes. A spot's
  counts are the sum of its bins' counts, so "the coarse profile is the aggregate of the fine
  ones" is the relation that holds in the data; PCC across genes ignores the per-row scale and
  shift that separate a mean of log-normalised bins from a log-normalised sum. It does not force
  each bin to copy its spot, which would erase the within-spot heterogeneity Visium HD measures.
- ``"reference"``: as in the released code, each bin's label against the prediction of its spot
  (global) node, ``1 - PCC`` across genes: it pulls the coarse heads towards every bin's profile.

Count likelihoods (``bin``: ``poisson`` or ``nb``, magnet/models/counts.py): the bin data term is the mean
negative log-likelihood of the raw counts ``y`` (``Batch.bin_counts``) with mean ``mu = exp(log_rate) *
libsize`` (``Batch.bin_libsize``), in place of the squared error; the other terms read the normalised
predictions as for ``mse_pcc``. Negative binomial (NB2, ``theta = exp(log_dispersion)`` per gene, variance
``mu + mu^2 / theta``). ``spot`` / ``glob`` count likelihoods add the same negative log-likelihood of each
labelled spot cell's (tile's) summed counts (``Batch.spot_counts`` / ``glob_counts``, exposure
``spot_libsize`` / ``glob_libsize``), weighted ``spot_nll`` / ``glob_nll``, beside their PCC terms. A model that
predicts each bin's library size (``loss.libsize``) adds ``libsize`` x its squared error on ``log1p(libsize)``.

Each form sums its spot and global terms (as the reference does), each weighted by
``consistency``. Terms of a level the model does not predict (``None``) are left out.
"""

from __future__ import annotations

import torch

from magnet.loss_config import LossConfig


def row_pcc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (across columns), float32."""
    a = a.float() - a.float().mean(dim=-1, keepdim=True)
    b = b.float() - b.float().mean(dim=-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1) + eps)


def _masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def _group_mean(values: torch.Tensor, index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` rows per group ``index`` in ``[0, n)``, and the group sizes."""
    values = values.float()
    total = values.new_zeros(n, values.shape[1]).index_add(0, index, values)
    count = values.new_zeros(n).index_add(0, index, values.new_ones(index.shape[0]))
    return total / count.clamp_min(1.0)[:, None], count


def count_nll(log_rate: torch.Tensor, counts: torch.Tensor, libsize: torch.Tensor,
              log_dispersion: torch.Tensor | None = None) -> torch.Tensor:
    """Per-element negative log-likelihood (Nb, G) of ``counts`` under Poisson (``log_dispersion`` None) or NB2
    with mean ``exp(log_rate) * libsize``; bins of zero library size (no counts, mean 0) contribute 0."""
    y = counts.float()
    log_mu = log_rate.float() + torch.log(libsize.float().clamp_min(1e-30))[:, None]
    if log_dispersion is None:
        return torch.exp(log_mu) - y * log_mu + torch.lgamma(y + 1)
    log_theta = log_dispersion.float()[None, :]
    theta = torch.exp(log_theta)
    log_sum = torch.logaddexp(log_theta, log_mu)  # log(theta + mu)
    return -(torch.lgamma(y + theta) - torch.lgamma(theta) - torch.lgamma(y + 1)
             + theta * (log_theta - log_sum) + y * (log_mu - log_sum))


def _node_nll(pred, batch, name: str, likelihood: str, mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the summed counts of the labelled nodes of level ``name`` (spot, glob)."""
    log_rate, counts = getattr(pred, f"{name}_log_rate"), getattr(batch, f"{name}_counts", None)
    if log_rate is None or counts is None:
        raise ValueError(f"loss.{name} {likelihood} needs a count model's log-rates and the batch's {name} counts")
    dispersion = getattr(pred, f"{name}_log_dispersion") if likelihood == "nb" else None
    nll = count_nll(log_rate, counts, getattr(batch, f"{name}_libsize"), dispersion).mean(-1)
    return _masked_mean(nll, mask)


def compute_loss(pred, batch, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its unweighted parts (detached scalars, for logging).

    ``pred`` is :class:`magnet.models.predictions.Predictions`, ``batch`` a :class:`magnet.batch.Batch`.
    Spot/global terms use only labelled nodes (``spot_mask``, ``glob_mask``). Computed in float32.
    """
    target = batch.bin_expr.float()
    parts = {"bin_pcc": 1.0 - row_pcc(pred.bin, target, cfg.eps).mean()}
    if cfg.bin == "mse_pcc":
        parts["bin_mse"] = torch.mean((pred.bin.float() - target) ** 2)
        total = cfg.bin_mse * parts["bin_mse"]
    else:
        if pred.bin_log_rate is None or batch.bin_counts is None or batch.bin_libsize is None:
            raise ValueError(f"loss.bin {cfg.bin} needs a count model's log-rates and the batch's raw counts")
        dispersion = pred.log_dispersion if cfg.bin == "nb" else None
        parts["bin_nll"] = count_nll(pred.bin_log_rate, batch.bin_counts, batch.bin_libsize, dispersion).mean()
        total = cfg.bin_nll * parts["bin_nll"]
        if pred.bin_log_libsize is not None:
            parts["libsize_mse"] = torch.mean((pred.bin_log_libsize - torch.log1p(batch.bin_libsize.float())) ** 2)
            total = total + cfg.libsize * parts["libsize_mse"]
    total = total + cfg.bin_pcc * parts["bin_pcc"]
    consistency = []
    for name, weight in (("spot", cfg.spot_pcc), ("glob", cfg.glob_pcc)):
        node_pred = getattr(pred, name)
        if node_pred is None:
            continue
        mask = getattr(batch, f"{name}_mask")
        parts[f"{name}_pcc"] = 1.0 - _masked_mean(row_pcc(node_pred, getattr(batch, f"{name}_expr"), cfg.eps), mask)
        total = total + weight * parts[f"{name}_pcc"]
        if getattr(cfg, name) != "pcc":
            parts[f"{name}_nll"] = _node_nll(pred, batch, name, getattr(cfg, name), mask)
            total = total + getattr(cfg, f"{name}_nll") * parts[f"{name}_nll"]
        bin_node = getattr(batch, f"bin_{name}")
        if cfg.consistency_form == "aggregate":
            agg, count = _group_mean(pred.bin, bin_node, node_pred.shape[0])
            term = 1.0 - _masked_mean(row_pcc(agg, node_pred, cfg.eps), count > 0)
        else:
            term = 1.0 - row_pcc(node_pred[bin_node], target, cfg.eps).mean()
        parts[f"{name}_consistency"] = term
        consistency.append(term)
    if consistency:
        total = total + cfg.consistency * torch.stack(consistency).sum()
    return total, {k: v.detach() for k, v in parts.items()}

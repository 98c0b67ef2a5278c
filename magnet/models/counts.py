"""Count models: the heads output log-rates per unit exposure, the loss is a likelihood on raw counts.

A model trained with ``loss.bin: poisson`` or ``nb`` is any registered model wrapped by :class:`CountModel`:
its heads' outputs are read as ``log(rate)``, the expected counts of a bin being ``rate * libsize`` (the bin's
total count over all genes: the exposure, offset with a log link). Everything downstream of the model (metrics,
``magnet predict``, ``magnet evaluate``) reads ``Predictions.bin``/``spot``/``glob`` in the sharding
normalisation, so the wrapper converts each level with :func:`normalised`: under ``log1p_libsize``
(``log1p(counts * target_sum / libsize)``, sharding/genes.py ``normalise``) the expected counts ``rate *
libsize`` give ``log1p(rate * target_sum)``, whatever the library size, computed as ``softplus(log_rate +
log(target_sum))`` (no overflow). The log-rates stay in ``Predictions.bin_log_rate`` (``spot_log_rate``,
``glob_log_rate``) for the likelihoods; ``nb`` adds one learned log-dispersion per gene for each level it is
used at (``Predictions.log_dispersion`` for the bins, ``spot_log_dispersion``, ``glob_log_dispersion``).

That value of the expected counts is not what a bin measures on average: a gene's normalised value is
``log1p(C * target_sum / L)`` with ``C`` its count and ``L`` the bin's total, mostly 0 in a small bin, and its
mean follows the bin's density (``L``) as much as the gene's share. With ``loss.libsize > 0`` the model also
predicts each bin's library size (one more output column of every head, read at the bins only: ``log1p(L)``,
trained by a squared error weighted ``loss.libsize``), and the bins' normalised prediction becomes the expected
normalised value under the fitted rates, ``E[log1p(C * target_sum / (C + R))]`` with ``C`` Poisson (NB) of mean
``rate * L`` and ``R = L - rate * L`` the bin's other counts at their mean (:func:`expected_normalised`), the
quantity a squared error on the normalised targets estimates. The spot cells and tiles hold enough counts that
the two values agree; they keep the value of the expected counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from magnet.errors import UserError
from magnet.loss_config import LossConfig
from magnet.models.predictions import Predictions

COUNT_LOSSES = ("poisson", "nb")


def normalised(log_rate: torch.Tensor, target_sum: float) -> torch.Tensor:
    """``log1p(exp(log_rate) * target_sum)``: the ``log1p_libsize`` value of the expected counts."""
    return F.softplus(log_rate.float() + math.log(target_sum))


def expected_normalised(log_rate: torch.Tensor, libsize: torch.Tensor, target_sum: float,
                        log_dispersion: torch.Tensor | None = None, exact: int = 12, tail: int = 24) -> torch.Tensor:
    """``E[log1p(C * target_sum / (C + R))]`` per bin and gene, ``C`` Poisson (NB2 with ``log_dispersion``) of mean
    ``mu = exp(log_rate) * libsize``, ``R = libsize - mu`` (floored at 0). The expectation is a weighted sum over
    the counts ``0 .. exact - 1`` and ``tail`` points spread geometrically over the rest of the distribution's
    range (each weighted by its probability times the width it stands for), the weights normalised: within 0.002
    of the exact sum for means from 1e-4 to 900 (tests/test_count_losses.py)."""
    lib = libsize.float().clamp_min(1e-8)[:, None]
    log_mu = log_rate.float() + torch.log(lib)
    mu = torch.exp(log_mu)
    sd = (mu if log_dispersion is None else mu + mu * mu / torch.exp(log_dispersion.float())[None, :]).sqrt()
    lo = exact - 0.5  # the tail starts past the exact counts, or 6 sd below the mean
    start = torch.maximum(mu - 6 * sd, torch.full_like(mu, lo))
    end = torch.maximum(mu + 10 * sd, 4 * start)
    edges = start[..., None] * (end / start)[..., None] ** (torch.arange(tail + 1, device=mu.device) / tail)
    k = torch.cat([torch.arange(exact, dtype=mu.dtype, device=mu.device).expand(*mu.shape, exact),
                   (edges[..., 1:] * edges[..., :-1]).sqrt()], -1)
    log_width = torch.cat([mu.new_zeros(*mu.shape, exact), torch.log(edges[..., 1:] - edges[..., :-1])], -1)
    log_mu = log_mu[..., None]
    if log_dispersion is None:
        log_p = k * log_mu - mu[..., None] - torch.lgamma(k + 1)
    else:
        log_theta = log_dispersion.float()[None, :, None]
        theta = torch.exp(log_theta)
        log_sum = torch.logaddexp(log_theta, log_mu)
        log_p = (torch.lgamma(k + theta) - torch.lgamma(theta) - torch.lgamma(k + 1) + theta * (log_theta - log_sum)
                 + k * (log_mu - log_sum))
    weight = torch.softmax(log_p + log_width, -1)
    rest = (lib - mu).clamp_min(0.0)[..., None]
    return (weight * torch.log1p(k * target_sum / (k + rest).clamp_min(1e-8))).sum(-1)


def output_width(loss: LossConfig, n_genes: int) -> int:
    """The outputs of each head of a model trained with ``loss``: the genes, and the library size with ``libsize``."""
    return n_genes + int(loss.bin in COUNT_LOSSES and loss.libsize > 0)


def log_rate_of(normalised_value: torch.Tensor, target_sum: float) -> torch.Tensor:
    """The inverse of :func:`normalised` (values floored at 1e-6 so that zero maps to a finite rate)."""
    return torch.log(torch.expm1(normalised_value.float()).clamp_min(1e-6)) - math.log(target_sum)


class CountModel(nn.Module):
    """``inner`` with its outputs read as log-rates per unit exposure (see the module docstring)."""

    def __init__(self, inner: nn.Module, n_genes: int, target_sum: float, dispersion: bool,
                 spot_dispersion: bool = False, glob_dispersion: bool = False, libsize: bool = False):
        super().__init__()
        self.inner = inner
        self.n_genes = n_genes
        self.target_sum = float(target_sum)
        self.libsize = libsize  # the inner heads' last output: log1p of the library size (bins; unused elsewhere)
        # theta = exp(.), NB2; one per gene and level (a spot cell's counts are not as overdispersed as a bin's)
        self.log_dispersion = nn.Parameter(torch.zeros(n_genes)) if dispersion else None
        self.spot_log_dispersion = nn.Parameter(torch.zeros(n_genes)) if spot_dispersion else None
        self.glob_log_dispersion = nn.Parameter(torch.zeros(n_genes)) if glob_dispersion else None

    @property
    def encoder(self):  # prediction readies the bin encoder (magnet/models/inference.py)
        return getattr(self.inner, "encoder", None)

    @property
    def feat_scale(self):  # initialisation sets the frozen-feature scalers (magnet/models/init.py)
        return getattr(self.inner, "feat_scale", {})

    def output_biases(self) -> list[nn.Parameter]:
        return self.inner.output_biases()

    def forward(self, batch) -> Predictions:
        p = self.inner(batch)
        G = self.n_genes
        rates = {k: None if v is None else v[:, :G].float()
                 for k, v in (("bin", p.bin), ("spot", p.spot), ("glob", p.glob))}
        level = {k: None if v is None else normalised(v, self.target_sum) for k, v in rates.items()}
        log_libsize = None
        if self.libsize:  # the library size and dispersion as fitted by their own terms, not moved by the PCC terms
            log_libsize = p.bin[:, G].float()
            dispersion = None if self.log_dispersion is None else self.log_dispersion.detach()
            level["bin"] = expected_normalised(rates["bin"], predicted_libsize(log_libsize).detach(), self.target_sum,
                                               dispersion)
        return Predictions(**level, bin_log_rate=rates["bin"], log_dispersion=self.log_dispersion,
                           spot_log_rate=rates["spot"], glob_log_rate=rates["glob"],
                           spot_log_dispersion=self.spot_log_dispersion, glob_log_dispersion=self.glob_log_dispersion,
                           bin_log_libsize=log_libsize)


def predicted_libsize(log_libsize: torch.Tensor) -> torch.Tensor:
    """A bin's library size from the model's ``log1p`` of it (floored at 0)."""
    return torch.expm1(log_libsize.float().clamp_min(0.0))


def for_loss(create, loss: LossConfig, n_genes: int, normalisation: dict, where: str) -> nn.Module:
    """The model ``create(n_outputs)`` builds, as trained with ``loss``: unchanged for ``mse_pcc``, a
    :class:`CountModel` for count losses (which need shards normalised with ``log1p_libsize``, the only
    normalisation whose value of the expected counts does not depend on the library size)."""
    model = create(output_width(loss, n_genes))
    if loss.bin not in COUNT_LOSSES:
        return model
    if normalisation.get("method") != "log1p_libsize":
        raise UserError(f"{where}: normalisation: loss.bin {loss.bin} needs shards normalised with log1p_libsize, "
                        f"not {normalisation.get('method')}")
    return CountModel(model, n_genes, float(normalisation["target_sum"]), dispersion=loss.bin == "nb",
                      spot_dispersion=loss.spot == "nb", glob_dispersion=loss.glob == "nb", libsize=loss.libsize > 0)

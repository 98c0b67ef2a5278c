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


def log_rate_of(normalised_value: torch.Tensor, target_sum: float) -> torch.Tensor:
    """The inverse of :func:`normalised` (values floored at 1e-6 so that zero maps to a finite rate)."""
    return torch.log(torch.expm1(normalised_value.float()).clamp_min(1e-6)) - math.log(target_sum)


class CountModel(nn.Module):
    """``inner`` with its outputs read as log-rates per unit exposure (see the module docstring)."""

    def __init__(self, inner: nn.Module, n_genes: int, target_sum: float, dispersion: bool,
                 spot_dispersion: bool = False, glob_dispersion: bool = False):
        super().__init__()
        self.inner = inner
        self.target_sum = float(target_sum)
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
        level = {k: None if v is None else normalised(v, self.target_sum)
                 for k, v in (("bin", p.bin), ("spot", p.spot), ("glob", p.glob))}
        return Predictions(**level, bin_log_rate=p.bin.float(), log_dispersion=self.log_dispersion,
                           spot_log_rate=None if p.spot is None else p.spot.float(),
                           glob_log_rate=None if p.glob is None else p.glob.float(),
                           spot_log_dispersion=self.spot_log_dispersion, glob_log_dispersion=self.glob_log_dispersion)


def for_loss(model: nn.Module, loss: LossConfig, n_genes: int, normalisation: dict, where: str) -> nn.Module:
    """``model`` as trained with ``loss``: unchanged for ``mse_pcc``, a :class:`CountModel` for count losses
    (which need shards normalised with ``log1p_libsize``, the only normalisation whose value of the expected
    counts does not depend on the library size)."""
    if loss.bin not in COUNT_LOSSES:
        return model
    if normalisation.get("method") != "log1p_libsize":
        raise UserError(f"{where}: normalisation: loss.bin {loss.bin} needs shards normalised with log1p_libsize, "
                        f"not {normalisation.get('method')}")
    return CountModel(model, n_genes, float(normalisation["target_sum"]), dispersion=loss.bin == "nb",
                      spot_dispersion=loss.spot == "nb", glob_dispersion=loss.glob == "nb")

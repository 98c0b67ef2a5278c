"""The loss section of the experiment config, apart from the loss itself so that reading a config needs no torch
(``magnet train`` refuses a run folder in use within a second or two, before any launch)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """Loss section (``loss.*``): the bin likelihood, weights of each term and the consistency form.

    ``bin``: ``mse_pcc`` (the paper's: ``bin_mse`` x squared error on the normalised values), ``poisson`` or
    ``nb`` (negative binomial, one learned dispersion per gene): ``bin_nll`` x the mean negative log-likelihood
    of the raw counts (shards written with ``shard.keep_counts``), the bin's total count as exposure. The PCC,
    spot, global and consistency terms are the same for every ``bin`` (on the normalised values)."""

    bin: Literal["mse_pcc", "poisson", "nb"] = "mse_pcc"
    bin_mse: float = 0.75
    bin_nll: float = 1.0
    bin_pcc: float = 0.1
    spot_pcc: float = 0.05
    glob_pcc: float = 0.05
    consistency: float = 0.05
    consistency_form: Literal["aggregate", "reference"] = "aggregate"
    eps: float = 1e-8  # in the PCC denominator; a constant row scores PCC 0

    def __post_init__(self):
        for key in ("bin_mse", "bin_nll", "bin_pcc", "spot_pcc", "glob_pcc", "consistency"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")

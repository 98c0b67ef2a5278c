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
    spot, global and consistency terms are the same for every ``bin`` (on the normalised values).

    ``spot`` and ``glob``: ``pcc`` (the paper's: ``spot_pcc`` / ``glob_pcc`` x (1 - PCC) only), ``poisson`` or
    ``nb``, which add ``spot_nll`` / ``glob_nll`` x the mean negative log-likelihood of the spot cell's (tile's)
    summed raw counts, its total count as exposure (one learned dispersion per gene and level for ``nb``). They
    need a count ``bin`` likelihood: a count model's heads all output log-rates.

    ``libsize`` (count models): the weight of a squared error on each bin's ``log1p`` library size, predicted by
    the model beside its rates; above 0 the bins' predictions become the expected normalised value under the
    fitted rates and that library size (magnet/models/counts.py), 0 (the default) leaves them the normalised
    value of the expected counts."""

    bin: Literal["mse_pcc", "poisson", "nb"] = "mse_pcc"
    bin_mse: float = 0.75
    bin_nll: float = 1.0
    bin_pcc: float = 0.1
    spot: Literal["pcc", "poisson", "nb"] = "pcc"
    glob: Literal["pcc", "poisson", "nb"] = "pcc"
    spot_nll: float = 0.05
    glob_nll: float = 0.05
    libsize: float = 0.0
    spot_pcc: float = 0.05
    glob_pcc: float = 0.05
    consistency: float = 0.05
    consistency_form: Literal["aggregate", "reference"] = "aggregate"
    eps: float = 1e-8  # in the PCC denominator; a constant row scores PCC 0

    def __post_init__(self):
        for key in ("bin_mse", "bin_nll", "bin_pcc", "spot_nll", "glob_nll", "libsize", "spot_pcc", "glob_pcc",
                    "consistency"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        for level in ("spot", "glob"):
            if getattr(self, level) != "pcc" and self.bin == "mse_pcc":
                raise ValueError(f"{level} {getattr(self, level)} needs a count likelihood for bin (poisson or nb): "
                                 f"a count model's heads all output log-rates, an mse_pcc model's normalised values")
        if self.libsize > 0 and self.bin == "mse_pcc":
            raise ValueError(f"libsize {self.libsize} needs a count likelihood for bin (poisson or nb): an mse_pcc "
                             f"model predicts the normalised values themselves")

    def levels(self) -> dict[str, str]:
        """The count likelihood of each level that has one: ``{"bin": "nb", "spot": "poisson"}``."""
        return {k: v for k, v in (("bin", self.bin), ("spot", self.spot), ("glob", self.glob)) if v in ("poisson", "nb")}

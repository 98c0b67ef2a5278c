"""The loss section of the experiment config, apart from the loss itself so that reading a config needs no torch
(``magnet train`` refuses a run folder in use within a second or two, before any launch)."""

from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(kw_only=True)
class LossConfig:
    """Loss section (``loss.*``): weights of each term and the consistency form."""

    bin_mse: float = 0.75
    bin_pcc: float = 0.1
    spot_pcc: float = 0.05
    glob_pcc: float = 0.05
    consistency: float = 0.05
    consistency_form: Literal["aggregate", "reference"] = "aggregate"
    eps: float = 1e-8  # in the PCC denominator; a constant row scores PCC 0

    def __post_init__(self):
        for key in ("bin_mse", "bin_pcc", "spot_pcc", "glob_pcc", "consistency"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")

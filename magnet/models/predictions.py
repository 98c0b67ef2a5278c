"""What every model returns: expression predictions per level."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Predictions:
    """``bin`` (Nb, G); ``spot`` (Ns, G) and ``glob`` (Ng, G) for every spot/global node of the batch
    (labelled or not; losses and metrics select with ``Batch.spot_mask``/``glob_mask``), or ``None``
    for models without that level (ST-Net, the no-spot / no-global ablations). Always in the sharding
    normalisation. Count models (magnet/models/counts.py) add the log-rates per unit exposure of each level
    (``bin_log_rate`` (Nb, G), ``spot_log_rate``, ``glob_log_rate``) and, for the negative binomial, the per-gene
    log-dispersion of each level that has one (``log_dispersion`` (G,) for the bins, ``spot_log_dispersion``,
    ``glob_log_dispersion``) and, with ``loss.libsize``, each bin's predicted ``log1p`` library size
    (``bin_log_libsize`` (Nb,))."""

    bin: torch.Tensor
    spot: torch.Tensor | None = None
    glob: torch.Tensor | None = None
    bin_log_rate: torch.Tensor | None = None
    log_dispersion: torch.Tensor | None = None
    spot_log_rate: torch.Tensor | None = None
    glob_log_rate: torch.Tensor | None = None
    spot_log_dispersion: torch.Tensor | None = None
    glob_log_dispersion: torch.Tensor | None = None
    bin_log_libsize: torch.Tensor | None = None

"""What every model returns: expression predictions per level."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Predictions:
    """``bin`` (Nb, G); ``spot`` (Ns, G) and ``glob`` (Ng, G) for every spot/global node of the batch
    (labelled or not; losses and metrics select with ``Batch.spot_mask``/``glob_mask``), or ``None``
    for models without that level (ST-Net, the no-spot / no-global ablations)."""

    bin: torch.Tensor
    spot: torch.Tensor | None = None
    glob: torch.Tensor | None = None

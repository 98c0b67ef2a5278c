"""The typed config of ``magnet evaluate`` (``--config FILE`` and ``key=value`` overrides)."""

from __future__ import annotations

import dataclasses

from magnet.predict.config import PredictConfig


@dataclasses.dataclass(kw_only=True)
class EvaluateConfig:
    top_k: int = 50  # pcc_gene_topk: the most variable measured genes of the evaluated slides (same for every model)
    spot: bool = True  # also at spot level: every model's bins pooled per spot cell, and spot heads where present
    oracle: bool = True  # add the oracle row where a slide has ground_truth/expected_{bin}um.h5 (synthetic)
    oracle_draws: int = 32  # Monte Carlo draws of Poisson counts for the oracle's expected target
    seed: int = 0  # of the oracle's draws (plus the bin size)
    controls: list[str] = dataclasses.field(default_factory=lambda: ["zero", "shuffle"])  # context controls of
    # every MagNet model (magnet/predict/context.py): extra rows "<label> (context zeroed|shuffled)"
    bootstrap: int = 2000  # resamples of the paired comparisons' 95% interval (seeded by seed)
    mlflow: bool = True  # log the tables and metrics as an MLflow run
    run_id: str = ""  # "" = a new MLflow run; else log into this existing run (e.g. an experiment's parent run)
    experiment: str = "magnet-evaluate"
    run_name: str = ""  # "" = evaluate-<timestamp>
    predict: PredictConfig = dataclasses.field(default_factory=lambda: PredictConfig(progress=False))

    def __post_init__(self):
        if self.top_k < 1 or self.oracle_draws < 1 or self.bootstrap < 100:
            raise ValueError(f"top_k and oracle_draws must be >= 1 and bootstrap >= 100, got {self.top_k}, "
                             f"{self.oracle_draws}, {self.bootstrap}")
        bad = [c for c in self.controls if c not in ("zero", "shuffle")]
        if bad:
            raise ValueError(f"controls: '{bad[0]}' is not a context control (zero, shuffle)")

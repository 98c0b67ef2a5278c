"""Every model over every held-out slide: whole-slide metrics per (level, model), mean and sd over slides.

A model is evaluated at the bin size it was trained on (its ``bin_um``), and at spot level on the spot
cells of its own geometry. Every model at one bin size is compared on the same bins, the same genes
(``genes``, columns picked from each model's own list) and the same measured targets, so the
``pcc_gene_topk`` genes (most variable measured genes of the evaluated slides) are the same for all;
the oracle row (synthetic slides) is scored on the same rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from magnet.errors import UserError
from magnet.evaluate import truth
from magnet.evaluate.config import EvaluateConfig
from magnet.metrics import ExpressionMetrics
from magnet.predict.model import LoadedModel
from sharding.genes import normalise
from sharding.samplesheet import SlideEntry

ORACLE = "oracle"
POOLED, SPOT_HEAD = "bins pooled per spot cell", "spot head"
ORACLE_SOURCE = "expected target given true means"


@dataclasses.dataclass
class Row:
    """One line of the table: a model (or the oracle) at one level (``bins`` or ``spot``)."""

    level: str
    bin_um: int
    model: str
    source: str  # what was scored: bin head, spot head, bins pooled per spot cell, expected counts
    uri: str
    metrics: ExpressionMetrics


def gene_columns(model: LoadedModel, label: str, genes: list[str]) -> list[int]:
    """Columns of ``genes`` in the model's output; a gene it was not trained on is a one-line error."""
    index = {g: i for i, g in enumerate(model.genes)}
    missing = [g for g in genes if g not in index]
    if missing:
        raise UserError(f"{model.uri}: genes: model '{label}' was not trained on '{missing[0]}' "
                        f"({len(missing)} of the {len(genes)} evaluated genes missing; its genes: "
                        f"{', '.join(model.genes[:5])}, ...)")
    return [index[g] for g in genes]


def gene_config(model: LoadedModel, cfg: EvaluateConfig):
    """The model's target normalisation (as its shards were built)."""
    from magnet.predict.slide import shard_config

    return shard_config(model, cfg.predict).genes


class Table:
    """Accumulates rows; :meth:`add_slide` runs every model on one slide."""

    def __init__(self, models: dict[str, LoadedModel], genes: list[str], cfg: EvaluateConfig):
        self.models, self.genes, self.cfg = models, genes, cfg
        self.columns = {label: gene_columns(m, label, genes) for label, m in models.items()}
        norms = {label: gene_config(m, cfg) for label, m in models.items()}
        if len({(g.normalisation, g.target_sum) for g in norms.values()}) > 1:
            raise UserError("--model: genes.normalisation: the models were trained on differently normalised targets "
                            f"({', '.join(f'{k}: {v.normalisation}' for k, v in norms.items())}); compare like with like")
        self.gcfg = next(iter(norms.values()))
        self.rows: dict[tuple[str, int, str, str], Row] = {}
        self.splits: dict[str, str] = {}

    def _row(self, level: str, bin_um: int, model: str, source: str, uri: str) -> ExpressionMetrics:
        key = (level, bin_um, model, source)
        if key not in self.rows:
            self.rows[key] = Row(level, bin_um, model, source, uri, ExpressionMetrics(len(self.genes)))
        return self.rows[key].metrics

    def add_slide(self, entry: SlideEntry, split: str) -> None:
        from magnet.predict.slide import predict_slide

        self.splits[entry.slide] = split
        oracle_done: set[int] = set()
        for label, model in self.models.items():
            bin_um = int(model.python_model.bin_um)
            pred = predict_slide(model, entry.image, bin_um, self.cfg.predict, spaceranger=entry.spaceranger,
                                 slide=entry.slide)
            if pred.measured is None:
                raise UserError(f"{entry.spaceranger}: filtered_feature_bc_matrix.h5: genes: the matrix lacks genes "
                                f"of model '{label}' (slide {entry.slide})")
            cols = self.columns[label]
            bins = pred.bins
            counts = bins.counts[:, cols].toarray().astype(np.float64)
            measured = normalise(counts, bins.libsize, self.gcfg)
            names = [entry.slide]
            self._row("bins", bin_um, label, "bin head", model.uri).update(pred.bin_pred[:, cols], measured,
                                                                         slide_names=names)
            cells, inverse = truth.spot_cells(pred.bin_spot)
            if self.cfg.spot:
                spot_measured = normalise(truth.sum_by(counts, inverse, len(cells)),
                                          truth.sum_by(bins.libsize, inverse, len(cells)), self.gcfg)
                pooled = truth.pool_bins(pred.bin_pred[:, cols], inverse, len(cells), self.gcfg)
                self._row("spot", bin_um, label, POOLED, model.uri).update(pooled, spot_measured, slide_names=names)
                head = pred.spot_pred[cells][:, cols]
                if np.isfinite(head).all():
                    self._row("spot", bin_um, label, SPOT_HEAD, model.uri).update(head, spot_measured, slide_names=names)
            gt = truth.expected_file(entry.spaceranger, bin_um)
            if self.cfg.oracle and bin_um not in oracle_done and gt.is_file():
                oracle_done.add(bin_um)
                means, gcols = truth.read_expected(gt, bins.barcodes, self.genes)
                seed = self.cfg.seed + bin_um
                self._row("bins", bin_um, ORACLE, ORACLE_SOURCE, str(gt.name)).update(
                    truth.oracle(means, gcols, self.gcfg, self.cfg.oracle_draws, seed), measured, slide_names=names)
                if self.cfg.spot:
                    spot_means = truth.sum_by(means, inverse, len(cells))
                    self._row("spot", bin_um, ORACLE, ORACLE_SOURCE, str(gt.name)).update(
                        truth.oracle(spot_means, gcols, self.gcfg, self.cfg.oracle_draws, seed), spot_measured,
                        slide_names=names)

    def results(self) -> list[dict]:
        """One dict per row: level, bin_um, model, source, uri, n_slides, ``{metric}`` mean and ``{metric}_sd``,
        and ``slides`` (per-slide metrics, with the slide's split), ordered by level, bin size, then model."""
        order = {label: i for i, label in enumerate(self.models)} | {ORACLE: len(self.models)}
        out = []
        for key in sorted(self.rows, key=lambda k: (k[0] != "bins", k[1], k[3] == SPOT_HEAD, order[k[2]])):
            r = self.rows[key]
            res = r.metrics.compute(top_k=self.cfg.top_k)
            out.append({"level": r.level, "bin_um": r.bin_um, "model": r.model, "source": r.source, "uri": r.uri,
                        "n_slides": len(res["slides"]), **res["mean"], **{f"{m}_sd": v for m, v in res["sd"].items()},
                        "slides": {s: {"split": self.splits[s], **v} for s, v in res["slides"].items()}})
        return out

"""Every model over every held-out slide: whole-slide metrics per (level, model), mean and sd over slides,
and for a cross-validated model (one model per fold) mean and sd over folds, a fold's value being the
mean over its held-out slides (each scored by the model of its fold).

A model is evaluated at the bin size it was trained on (its ``bin_um``), and at spot level on the spot
cells of its own geometry. Every model at one bin size is compared on the same bins, the same genes
(``genes``, columns picked from each model's own list) and the same measured targets, so the
``pcc_gene_topk`` genes (most variable measured genes of the evaluated slides) are the same for all;
the oracle row (synthetic slides) is scored on the same rows, and so is the local oracle row where the
ground truth has one. Every MagNet model is also run under each context control of ``controls``
(:mod:`magnet.predict.context`), as rows ``LABEL (context zeroed)`` / ``LABEL (context shuffled)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from magnet.errors import UserError
from magnet.evaluate import truth
from magnet.evaluate.config import EvaluateConfig
from magnet.evaluate.select import Models, each_model
from magnet.metrics import METRICS, ExpressionMetrics
from magnet.predict.cells import spaceranger_cells
from magnet.predict.model import LoadedModel
from magnet.predict.slide import predict_slide, shard_config
from magnet.spaceranger_layout import Outs
from sharding.genes import normalise
from sharding.samplesheet import SlideEntry

ORACLE, LOCAL_ORACLE = "oracle", "local oracle"
POOLED, SPOT_HEAD = "bins pooled per spot cell", "spot head"
FINE_POOLED = "2 um bins pooled"  # a 2 um model's bins summed to 8 and 16 um bins (rows of level "bins")
CELL_POOLED, CELL_VS_EXPECTED = "2 um bins pooled per cell", "2 um bins pooled per cell, vs expected target"
COARSER_UM = (8, 16)
ORACLE_SOURCE = "expected target given true means"
LOCAL_SOURCE = "expected target given local means"
CONTROL_NAMES = {"zero": "context zeroed", "shuffle": "context shuffled"}


def has_context(model: LoadedModel) -> bool:
    """A model reading the batch's context features (the MagNet family); the controls apply to it."""
    return str(model.python_model.config.model.name).startswith("magnet")


def control_label(label: str, control: str) -> str:
    return f"{label} ({CONTROL_NAMES[control]})"


@dataclasses.dataclass
class Row:
    """One line of the table: a model (or the oracle) at one level (``bins`` or ``spot``)."""

    level: str
    bin_um: int
    model: str
    source: str  # what was scored: bin head, spot head, bins pooled per spot cell, expected counts
    uri: str
    metrics: ExpressionMetrics
    folds: dict[str, int] = dataclasses.field(default_factory=dict)  # slide -> fold of the model that scored it


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
    return shard_config(model, cfg.predict).genes


class Table:
    """Accumulates rows; :meth:`add_slide` runs every model on one slide."""

    def __init__(self, models: Models, genes: list[str], cfg: EvaluateConfig):
        self.models, self.genes, self.cfg = models, genes, cfg
        self.columns = {(label, fold): gene_columns(m, label, genes) for label, fold, m in each_model(models)}
        norms = {label: gene_config(m, cfg) for label, _, m in each_model(models)}
        if len({(g.normalisation, g.target_sum) for g in norms.values()}) > 1:
            raise UserError("--model: genes.normalisation: the models were trained on differently normalised targets "
                            f"({', '.join(f'{k}: {v.normalisation}' for k, v in norms.items())}); compare like with like")
        self.gcfg = next(iter(norms.values()))
        self.rows: dict[tuple[str, int, str, str], Row] = {}
        self.order: dict[str, int] = {}  # row labels in the order first met (models, their controls, oracles)
        self.splits: dict[str, str] = {}

    def _row(self, level: str, bin_um: int, model: str, source: str, uri: str, fold: int | None = None,
             slide: str = "") -> ExpressionMetrics:
        key = (level, bin_um, model, source)
        if key not in self.rows:
            self.rows[key] = Row(level, bin_um, model, source, uri, ExpressionMetrics(len(self.genes)))
        if fold is not None:
            self.rows[key].folds[slide] = fold
        return self.rows[key].metrics

    def add_slide(self, entry: SlideEntry, split: str, scorer: dict[str, int | None]) -> None:
        """Every model on ``entry``; ``scorer``: per label, the fold of the model that scores this slide."""
        self.splits[entry.slide] = split
        oracle_done: set[int] = set()
        for base, group in self.models.items():
            fold = scorer[base]
            model = group[fold]
            uri = ", ".join(m.uri for m in group.values())
            bin_um = int(model.python_model.bin_um)
            for control in [None, *(self.cfg.controls if has_context(model) else [])]:
                label = base if control is None else control_label(base, control)
                pcfg = self.cfg.predict if control is None else dataclasses.replace(self.cfg.predict, context=control)
                self.order.setdefault(label, len(self.order))
                scored = self._add_prediction(entry, label, fold, model, uri, bin_um, pcfg, self.columns[(base, fold)])
                if control is None:
                    oracle_on = scored
            if self.cfg.oracle and bin_um not in oracle_done and truth.expected_file(entry.spaceranger, bin_um).is_file():
                oracle_done.add(bin_um)
                self._add_oracles(entry, bin_um, *oracle_on)

    def _add_prediction(self, entry: SlideEntry, label: str, fold: int | None, model: LoadedModel, uri: str,
                        bin_um: int, pcfg, cols: list[int]) -> tuple:
        """One model (or one of its controls, ``pcfg.context``) on one slide; returns what the oracles are
        scored against: (bins, measured, spot measured, spot cells, each bin's cell)."""
        pred = predict_slide(model, entry.image, bin_um, pcfg, spaceranger=entry.spaceranger, slide=entry.slide)
        if pred.measured is None:
            raise UserError(f"{entry.spaceranger}: {Outs.MATRIX}: genes: the matrix lacks genes "
                            f"of model '{label}' (slide {entry.slide})")
        bins = pred.bins
        counts = bins.counts[:, cols].toarray().astype(np.float64)
        measured = normalise(counts, bins.libsize, self.gcfg)
        names = [entry.slide]

        def row(level: str, source: str) -> ExpressionMetrics:
            return self._row(level, bin_um, label, source, uri, fold, entry.slide)

        row("bins", "bin head").update(pred.bin_pred[:, cols], measured, slide_names=names)
        extra = {k: v[:, cols] if v.ndim == 2 else v for k, v in pred.bin_extra.items()}
        cells, inverse = truth.spot_cells(pred.bin_spot)
        spot_measured = None
        if self.cfg.spot:
            spot_measured = normalise(truth.sum_by(counts, inverse, len(cells)),
                                      truth.sum_by(bins.libsize, inverse, len(cells)), self.gcfg)
            pooled = truth.pool_bins(pred.bin_pred[:, cols], inverse, len(cells), self.gcfg, extra)
            row("spot", POOLED).update(pooled, spot_measured, slide_names=names)
            head = pred.spot_pred[cells][:, cols]
            if np.isfinite(head).all():
                row("spot", SPOT_HEAD).update(head, spot_measured, slide_names=names)
        if bin_um == 2:
            self._add_pooled(entry, label, fold, uri, pred.bin_pred[:, cols], extra, counts, bins)
        return bins, measured, spot_measured, cells, inverse

    def _add_pooled(self, entry: SlideEntry, label: str, fold: int | None, uri: str, pred: np.ndarray, extra: dict,
                    counts: np.ndarray, bins) -> None:
        """A 2 um model's bins summed to 8 and 16 um bins and, where the slide has a Space Ranger 4 segmentation,
        per cell (Space Ranger's 2 um barcode mappings; :mod:`magnet.predict.cells`): against the measured
        counts summed alike and, on synthetic slides, each cell against its expected target (the oracle's) with
        the oracle row beside it."""
        names = [entry.slide]
        groups = [(b, f"{b} um bins", FINE_POOLED, bins.rc // (b // 2)) for b in COARSER_UM]
        for b, _, source, rc in groups:
            _, inverse = np.unique(rc[:, 0] * (int(rc[:, 1].max()) + 1) + rc[:, 1], return_inverse=True)
            self._pooled_row("bins", b, label, source, uri, fold, entry.slide, pred, extra, counts, bins.libsize,
                             inverse)
        if not Outs(entry.spaceranger).barcode_mappings.is_file():
            return
        ids, cell = spaceranger_cells(entry.spaceranger, bins.rc)
        keep = cell >= 0
        held, inverse = np.unique(cell[keep], return_inverse=True)
        kept = {k: v[keep] for k, v in extra.items()}
        measured = self._pooled_row("cells", 2, label, CELL_POOLED, uri, fold, entry.slide, pred[keep], kept,
                                    counts[keep], bins.libsize[keep], inverse)
        gt = truth.expected_cells_file(entry.spaceranger)
        if not (self.cfg.oracle and gt.is_file()):
            return
        means, gcols = truth.read_expected(gt, ids[held], self.genes)
        target = truth.oracle(means, gcols, self.gcfg, self.cfg.oracle_draws, self.cfg.seed + 2)
        pooled = truth.pool_bins(pred[keep], inverse, len(held), self.gcfg, kept)
        self._row("cells", 2, label, CELL_VS_EXPECTED, uri, fold, entry.slide).update(pooled, target, slide_names=names)
        self.order.setdefault(ORACLE, len(self.order) + 1000)
        self._row("cells", 2, ORACLE, ORACLE_SOURCE, gt.name).update(target, measured, slide_names=names)

    def _pooled_row(self, level: str, bin_um: int, label: str, source: str, uri: str, fold: int | None, slide: str,
                    pred: np.ndarray, extra: dict, counts: np.ndarray, libsize: np.ndarray,
                    inverse: np.ndarray) -> np.ndarray:
        """Bins pooled by ``inverse`` (equal library sizes, :func:`truth.pool_bins`) scored against the measured
        counts summed alike; returns the measured (normalised) values."""
        n = int(inverse.max()) + 1
        measured = normalise(truth.sum_by(counts, inverse, n), truth.sum_by(libsize, inverse, n), self.gcfg)
        self._row(level, bin_um, label, source, uri, fold, slide).update(
            truth.pool_bins(pred, inverse, n, self.gcfg, extra), measured, slide_names=[slide])
        return measured

    def _add_oracles(self, entry: SlideEntry, bin_um: int, bins, measured, spot_measured, cells, inverse) -> None:
        """The oracle and, where the ground truth has it, the local oracle (expected target given the bin's own
        cell content: :func:`truth.local_expected_file`) on one slide."""
        names = [entry.slide]
        seed = self.cfg.seed + bin_um
        for name, source, gt in ((ORACLE, ORACLE_SOURCE, truth.expected_file(entry.spaceranger, bin_um)),
                                 (LOCAL_ORACLE, LOCAL_SOURCE, truth.local_expected_file(entry.spaceranger, bin_um))):
            if not gt.is_file():
                continue
            self.order.setdefault(name, len(self.order) + 1000)
            means, gcols = truth.read_expected(gt, bins.barcodes, self.genes)
            self._row("bins", bin_um, name, source, str(gt.name)).update(
                truth.oracle(means, gcols, self.gcfg, self.cfg.oracle_draws, seed), measured, slide_names=names)
            if self.cfg.spot:
                spot_means = truth.sum_by(means, inverse, len(cells))
                self._row("spot", bin_um, name, source, str(gt.name)).update(
                    truth.oracle(spot_means, gcols, self.gcfg, self.cfg.oracle_draws, seed), spot_measured,
                    slide_names=names)

    def results(self) -> list[dict]:
        """One dict per row: level, bin_um, model, source, uri, n_slides, ``{metric}`` mean and ``{metric}_sd``
        over slides, ``n_folds`` with ``{metric}_fold_mean`` and ``{metric}_fold_sd`` over folds (a row
        without folds: ``n_folds`` 0 and no fold keys), ``slides`` (per-slide metrics, with the slide's split and fold)
        and ``gene_pcc`` (per slide, the (G,) PCC per gene), ordered by level, bin size, then model."""
        out = []
        level_order = {"bins": 0, "spot": 1, "cells": 2}
        for key in sorted(self.rows, key=lambda k: (level_order[k[0]], k[1], k[3] == SPOT_HEAD, self.order[k[2]])):
            r = self.rows[key]
            res = r.metrics.compute(top_k=self.cfg.top_k)
            out.append({"level": r.level, "bin_um": r.bin_um, "model": r.model, "source": r.source, "uri": r.uri,
                        "n_slides": len(res["slides"]), **res["mean"], **{f"{m}_sd": v for m, v in res["sd"].items()},
                        **over_folds(res["slides"], r.folds),
                        "slides": {s: {"split": self.splits[s], "fold": r.folds.get(s), **v}
                                   for s, v in res["slides"].items()},
                        "gene_pcc": {s: p for s, p in zip(r.metrics.slides, r.metrics.pcc_per_gene())
                                     if s in res["slides"]}})
        return out


def over_folds(slides: dict[str, dict], folds: dict[str, int]) -> dict:
    """``n_folds``, and per metric the mean and sample sd (ddof=1; 0 with one fold) over folds of each
    fold's mean over its slides; ``{"n_folds": 0}`` for a row without folds."""
    by_fold: dict[int, list[dict]] = {}
    for slide, values in slides.items():
        if slide in folds:
            by_fold.setdefault(folds[slide], []).append(values)
    out: dict = {"n_folds": len(by_fold)}
    if not by_fold:
        return out
    for m in METRICS:
        per_fold = np.array([np.mean([v[m] for v in vs]) for _, vs in sorted(by_fold.items())])
        out[f"{m}_fold_mean"] = float(per_fold.mean())
        out[f"{m}_fold_sd"] = float(per_fold.std(ddof=1)) if len(per_fold) > 1 else 0.0
    return out

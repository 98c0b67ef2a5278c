"""Whole-slide expression metrics from streaming, mergeable sums (never averages of batch averages).

:class:`ExpressionMetrics` keeps, per slide, float64 sums whose element-wise SUM over ranks or
batches is the state of the union: ``n`` (rows), ``sse``/``sae`` (squared / absolute error over all
entries), ``row_pcc`` (sum over rows of the per-row PCC across genes) and, per gene,
``sx, sy, sxx, syy, sxy`` (x = prediction, y = measurement), so the per-gene PCC across all rows
of a slide is exact. Two protocols:

- ``pcc_bin``: PCC per bin (row) across genes, averaged over the slide's bins (MagNet paper);
- ``pcc_gene``: PCC per gene across the slide's bins, averaged over genes (HEST), and
  ``pcc_gene_topk`` over the ``top_k`` most variable genes.

A PCC with a constant side (variance below ``REL_TOL`` times its mean square, i.e. rounding
noise of the exact sums) is defined as 0 (the reference's ``1e-8`` guard gives the
same), so a constant predictor scores 0 per gene. Across slides: mean and sample sd (ddof=1; 0 with
one slide). Distributed use: build every rank's accumulator with the same ``slides`` list, then
all-reduce (sum) each array of :meth:`state_dict` and :meth:`load_state_dict` the result.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

ROW_KEYS = ("n", "sse", "sae", "row_pcc")
GENE_KEYS = ("sx", "sy", "sxx", "syy", "sxy")
METRICS = ("mse", "mae", "pcc_bin", "pcc_gene", "pcc_gene_topk")


REL_TOL = 1e-10  # a variance below REL_TOL * mean square is rounding noise: the side is constant


def _pcc(cov, vx, vy, msx, msy):
    """PCC from (co)variances; 0 where a side is constant. Works for numpy arrays and torch tensors."""
    ok = (vx > REL_TOL * msx) & (vy > REL_TOL * msy)
    den = (vx * vy).clip(min=0) ** 0.5
    return cov / (den + (den == 0)) * ok


def _as_double(a, device=None) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a.detach().to(device=device, dtype=torch.float64)
    return torch.from_numpy(np.array(a, dtype=np.float64)).to(device)


class ExpressionMetrics:
    """Per-slide accumulators for one level (bins, or spot / global nodes), ``G`` genes."""

    def __init__(self, n_genes: int, slides: Sequence[str] = ()):
        self.n_genes = n_genes
        self.slides: list[str] = []
        self.state: dict[str, np.ndarray] = {k: np.zeros(0) for k in ROW_KEYS}
        self.state.update({k: np.zeros((0, n_genes)) for k in GENE_KEYS})
        self._add_slides(slides)

    def _add_slides(self, names: Sequence[str]) -> None:
        new = [s for s in dict.fromkeys(names) if s not in self.slides]
        if not new:
            return
        self.slides += new
        for k, v in self.state.items():
            self.state[k] = np.concatenate([v, np.zeros((len(new),) + v.shape[1:])])

    def update(self, pred, target, slide_index=None, slide_names: Sequence[str] = ("slide",)) -> None:
        """Add rows: ``pred``, ``target`` (N, G) tensors or arrays; row ``i`` belongs to slide
        ``slide_names[slide_index[i]]`` (``slide_index`` None: all rows to ``slide_names[0]``).

        With a batch: ``update(pred.bin, batch.bin_expr, batch.bin_slide, batch.slides)``; select
        spot/global rows first (e.g. ``batch.spot_mask & batch.spot_centre``). Sums are taken in
        float64 on the tensors' device; only (S, G) sums come back to the host.
        """
        x = _as_double(pred)
        y = _as_double(target, x.device)
        if x.shape != y.shape or x.ndim != 2 or x.shape[1] != self.n_genes:
            raise ValueError(f"pred {tuple(x.shape)} and target {tuple(y.shape)} must both be (N, {self.n_genes})")
        self._add_slides(slide_names)
        lookup = torch.tensor([self.slides.index(s) for s in slide_names], dtype=torch.long, device=x.device)
        if slide_index is None:
            rows = lookup[0].repeat(x.shape[0])
        else:
            rows = lookup[torch.as_tensor(slide_index, device=x.device).long()]
        err = x - y
        xc, yc = x - x.mean(1, keepdim=True), y - y.mean(1, keepdim=True)
        row_pcc = _pcc((xc * yc).sum(1), (xc * xc).sum(1), (yc * yc).sum(1), (x * x).sum(1), (y * y).sum(1))
        values = {"n": torch.ones_like(row_pcc), "sse": (err * err).sum(1), "sae": err.abs().sum(1), "row_pcc": row_pcc,
                  "sx": x, "sy": y, "sxx": x * x, "syy": y * y, "sxy": x * y}
        S = len(self.slides)
        for k, v in values.items():
            acc = v.new_zeros((S,) + v.shape[1:]).index_add_(0, rows, v)
            self.state[k] += acc.cpu().numpy()

    def state_dict(self) -> dict:
        return {"slides": list(self.slides), **{k: v.copy() for k, v in self.state.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.slides = list(state["slides"])
        self.state = {k: np.asarray(state[k], dtype=np.float64).copy() for k in ROW_KEYS + GENE_KEYS}

    def merge(self, other: ExpressionMetrics) -> None:
        """Add ``other``'s sums slide by slide (by name)."""
        self._add_slides(other.slides)
        rows = [self.slides.index(s) for s in other.slides]
        for k in self.state:
            np.add.at(self.state[k], rows, other.state[k])

    def pcc_per_gene(self) -> np.ndarray:
        """(S, G) exact PCC per gene across each slide's rows."""
        s, n = self.state, np.maximum(self.state["n"], 1)[:, None]
        cov = s["sxy"] - s["sx"] * s["sy"] / n
        return _pcc(cov, s["sxx"] - s["sx"] ** 2 / n, s["syy"] - s["sy"] ** 2 / n, s["sxx"], s["syy"])

    def top_genes(self, top_k: int) -> np.ndarray:
        """Indices of the ``top_k`` genes of highest measured variance, pooled over all slides."""
        s = self.state
        n = max(s["n"].sum(), 1.0)
        var = s["syy"].sum(0) / n - (s["sy"].sum(0) / n) ** 2
        return np.argsort(-var, kind="stable")[: min(top_k, self.n_genes)]

    def compute(self, top_k: int = 50, genes: np.ndarray | None = None) -> dict:
        """``{"slides": {name: {metric: value, "n": rows}}, "mean": {...}, "sd": {...}}``.

        ``genes``: indices for ``pcc_gene_topk`` (e.g. chosen on the training split); default
        :meth:`top_genes` of these data. Slides without rows are left out.
        """
        s = self.state
        topk = self.top_genes(top_k) if genes is None else np.asarray(genes)
        n = np.maximum(s["n"], 1)
        gene_pcc = self.pcc_per_gene()
        table = {
            "mse": s["sse"] / (n * self.n_genes),
            "mae": s["sae"] / (n * self.n_genes),
            "pcc_bin": s["row_pcc"] / n,
            "pcc_gene": gene_pcc.mean(1),
            "pcc_gene_topk": gene_pcc[:, topk].mean(1),
        }
        keep = np.flatnonzero(s["n"] > 0)
        out = {"slides": {self.slides[i]: {**{m: float(table[m][i]) for m in METRICS}, "n": int(s["n"][i])}
                          for i in keep}}
        out["mean"] = {m: float(table[m][keep].mean()) if len(keep) else float("nan") for m in METRICS}
        out["sd"] = {m: float(table[m][keep].std(ddof=1)) if len(keep) > 1 else 0.0 for m in METRICS}
        return out


def oracle_ceiling(expected, measured, slide_index=None, slide_names: Sequence[str] = ("slide",),
                   top_k: int = 50, genes: np.ndarray | None = None) -> dict:
    """Metrics of the expected expression (e.g. a synthetic slide's Poisson means, normalised the
    same way as the labels) against the measured one: the ceiling no model can beat in expectation."""
    acc = ExpressionMetrics(np.shape(expected)[1], slide_names)
    acc.update(expected, measured, slide_index, slide_names)
    return acc.compute(top_k=top_k, genes=genes)

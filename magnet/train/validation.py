"""Evaluation on the validation slides: whole-slide metrics summed across ranks, equal forwards per rank.

Each rank streams its share of the split once (:class:`magnet.data.pipeline.EvalStream`); the
per-slide sums of :class:`magnet.metrics.ExpressionMetrics` are all-reduced, so the metrics are
those of the whole slides. Ranks agree on every step whether anyone still has data; under ZeRO-3
(where a forward is a collective) a rank that ran out repeats a forward on a spare batch and
discards it.
"""

from __future__ import annotations

import numpy as np
import torch

from magnet import dist
from magnet.losses import compute_loss
from magnet.metrics import ExpressionMetrics

LEVELS = ("bin", "spot", "glob")


def _rows(batch, pred, level: str):
    """(prediction, target, slide index) of the labelled rows of one level (centre tiles only)."""
    if level == "bin":
        return pred.bin, batch.bin_expr, batch.bin_slide
    p = getattr(pred, level)
    if p is None:
        return None
    if level == "spot":
        keep = batch.spot_mask & batch.spot_centre
        slide = batch.sample_slide[batch.glob_sample[batch.spot_glob]]
    else:
        keep = batch.glob_mask & batch.glob_centre
        slide = batch.sample_slide[batch.glob_sample]
    return p[keep], getattr(batch, f"{level}_expr")[keep], slide[keep]


class MapSample:
    """Rank 0 keeps bin positions, predictions and labels of one slide for the gene-map figure."""

    def __init__(self, n_genes: int):
        self.slide, self.n_genes, self.parts = None, n_genes, []

    def add(self, batch, pred) -> None:
        if self.slide is None:
            self.slide = batch.slides[int(batch.bin_slide[0])] if batch.num_bins else None
        if self.slide not in batch.slides:
            return
        keep = batch.bin_slide == batch.slides.index(self.slide)
        g = self.n_genes
        self.parts.append((batch.bin_pos[keep].cpu().numpy(), pred.bin[keep, :g].float().cpu().numpy(),
                           batch.bin_expr[keep, :g].float().cpu().numpy()))

    def result(self) -> dict | None:
        if not self.parts:
            return None
        pos, pred, true = (np.concatenate(a) for a in zip(*self.parts))
        return {"pos": pos, "pred": pred, "true": true, "slide": self.slide}


def evaluate(engine, stream, cfg, spare_batch, lockstep_forward: bool, map_genes: int = 0):
    """``(metrics, per-slide table, map)``: flat means (``loss``, ``pcc_bin``, ``spot_pcc_gene`` ...)."""
    slides = sorted(s for s, v in stream.set.manifest.splits.items() if v == cfg.data.eval_split)
    n_genes = len(stream.set.genes)
    acc = {lvl: ExpressionMetrics(n_genes, slides) for lvl in LEVELS}
    gene_map = MapSample(map_genes) if dist.is_primary() and map_genes else None
    loss = torch.zeros(3, dtype=torch.float64)  # loss sum, batches, non-finite predicted values
    device = engine.device
    engine.eval()
    it = iter(stream)
    with torch.no_grad():
        while True:
            batch = next(it, None)
            more = dist.all_reduce_sum(torch.tensor([0.0 if batch is None else 1.0]))
            if more.item() == 0:
                break
            if batch is None:
                if lockstep_forward:
                    engine(spare_batch.to(device))
                continue
            spare_batch = batch
            batch = batch.to(device)
            pred = engine(batch)
            total, _ = compute_loss(pred, batch, cfg.loss)
            bad = sum(int((~torch.isfinite(p)).sum()) for p in (pred.bin, pred.spot, pred.glob) if p is not None)
            loss += torch.tensor([float(total), 1.0, bad], dtype=torch.float64)
            for lvl in LEVELS:
                rows = _rows(batch, pred, lvl)
                if rows is not None:
                    acc[lvl].update(rows[0], rows[1], rows[2], batch.slides)
            if gene_map is not None:
                gene_map.add(batch, pred)
    engine.train()
    dist.all_reduce_sum(loss)
    metrics = {"loss": loss[0].item() / max(loss[1].item(), 1.0), "nonfinite_predictions": loss[2].item()}
    table: dict[str, list] = {}
    for lvl in LEVELS:
        state = acc[lvl].state_dict()
        summed = {k: dist.all_reduce_sum(torch.from_numpy(v)).numpy() for k, v in state.items() if k != "slides"}
        acc[lvl].load_state_dict({"slides": state["slides"], **summed})
        if acc[lvl].state["n"].sum() == 0:
            continue
        res = acc[lvl].compute()
        prefix = "" if lvl == "bin" else f"{lvl}_"
        metrics.update({f"{prefix}{m}": v for m, v in res["mean"].items()})
        for slide, row in res["slides"].items():
            table.setdefault("slide", []).append(slide)
            table.setdefault("level", []).append(lvl)
            for m, v in row.items():
                table.setdefault(m, []).append(v)
    return metrics, table, (gene_map.result() if gene_map is not None else None)

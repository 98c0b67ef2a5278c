"""What a per-gene PCC on log-normalised targets rewards at fine bins: predictions of a synthetic slide scored
against the measured target and against the true expression (diagnosis of issue 23's count losses).

    python bench/count_units.py --slide context/cohort/synth_004 --bin-um 8 mse=pred_mse.h5ad poisson=pred_pois.h5ad

Each prediction is a `magnet predict` .h5ad of the slide (X in the training normalisation, `layers['measured']`
the slide's own normalised values). The truth is the slide's `ground_truth/expected_{bin}um.h5` (the Poisson
means of every gene in every bin) as proportions of the bin's expected total, normalised like the targets
(`log1p(p * target_sum)`): the expression a perfect model of the tissue would give, free of sampling noise and
of the bin's library size. Per model: the mean over genes of the per-gene PCC across bins against the measured
target (what `magnet evaluate` reports) and against the truth, for the less and the more expressed half of the
genes. Bins with no expected count are left out.

Measured 2026-12-06 (context benchmark, validation slide synth_004, 8 um, 10,493 bins; MagNet on tuned frozen
features, 400 steps, seed 0, configs/experiment/counts_8um.yaml):
  mse_pcc  vs measured 0.560 (low half 0.481, high 0.638); vs truth 0.366 (low 0.216, high 0.517)
  poisson  vs measured 0.235 (low half 0.111, high 0.358); vs truth 0.642 (low 0.593, high 0.691)
At 8 um a bin holds few counts: the normalised target of a gene is mostly 0 and, where not, log1p(target_sum /
libsize), so its expectation follows the bin's total transcript density as much as the gene's share. The
squared error learns that expectation; the Poisson model learns the share (its rate per unit exposure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import h5py
import numpy as np

from magnet.metrics import ExpressionMetrics


def truth(slide: Path, bin_um: int, barcodes: list[str], genes: list[str], target_sum: float) -> np.ndarray:
    """``log1p(p * target_sum)`` of the true proportions, rows in ``barcodes`` order, columns in ``genes`` order."""
    with h5py.File(slide / "ground_truth" / f"expected_{bin_um:03d}um.h5") as f:
        rows = {b.decode(): i for i, b in enumerate(f["barcodes"][:])}
        cols = {g.decode(): i for i, g in enumerate(f["genes"][:])}
        mu = f["expected"][:]
    mu = mu[[rows[b] for b in barcodes]]
    total = mu.sum(1, keepdims=True)
    share = np.divide(mu[:, [cols[g] for g in genes]], total, out=np.zeros((len(barcodes), len(genes))),
                      where=total > 0)
    return np.log1p(share * target_sum)


def pcc_per_gene(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Per-gene PCC across the bins, as magnet evaluate computes it."""
    m = ExpressionMetrics(pred.shape[1])
    m.update(pred, target)
    return m.pcc_per_gene()[0]


def scores(pred: ad.AnnData, slide: Path, bin_um: int, target_sum: float) -> dict[str, float]:
    dense = lambda x: x.toarray() if hasattr(x, "toarray") else np.asarray(x)  # noqa: E731
    true = truth(slide, bin_um, list(pred.obs_names), list(pred.var_names), target_sum)
    keep = true.sum(1) > 0
    x, measured, true = dense(pred.X)[keep], dense(pred.layers["measured"])[keep], true[keep]
    vs_measured, vs_truth = pcc_per_gene(x, measured), pcc_per_gene(x, true)
    mean = np.expm1(true).mean(0)
    low = mean < np.median(mean)
    return {"vs_measured": float(np.nanmean(vs_measured)), "vs_measured_low": float(np.nanmean(vs_measured[low])),
            "vs_measured_high": float(np.nanmean(vs_measured[~low])), "vs_truth": float(np.nanmean(vs_truth)),
            "vs_truth_low": float(np.nanmean(vs_truth[low])), "vs_truth_high": float(np.nanmean(vs_truth[~low])),
            "bins": int(keep.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", required=True, help="a magnet synth slide folder (ground_truth/)")
    ap.add_argument("--bin-um", type=int, required=True)
    ap.add_argument("--target-sum", type=float, default=1e4, help="the shards' normalisation target_sum")
    ap.add_argument("predictions", nargs="+", help="LABEL=PRED.h5ad")
    a = ap.parse_args()
    for spec in a.predictions:
        label, _, path = spec.partition("=")
        s = scores(ad.read_h5ad(path), Path(a.slide), a.bin_um, a.target_sum)
        print(f"{label:10s} vs measured {s['vs_measured']:.3f} (low half {s['vs_measured_low']:.3f}, high "
              f"{s['vs_measured_high']:.3f}); vs truth {s['vs_truth']:.3f} (low {s['vs_truth_low']:.3f}, high "
              f"{s['vs_truth_high']:.3f}); {s['bins']} bins")


if __name__ == "__main__":
    main()

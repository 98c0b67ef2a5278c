"""bench/count_units.py: predictions scored against the measured target and against a synthetic slide's truth
(the expected counts as proportions), aligned by barcode and gene whatever their order."""

from __future__ import annotations

import sys

import anndata as ad
import h5py
import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
from count_units import scores, truth  # noqa: E402


def test_a_prediction_equal_to_the_truth_scores_one_against_it(tiny_cohort):
    slide = tiny_cohort / "synth_000"
    with h5py.File(slide / "ground_truth/expected_008um.h5") as f:
        barcodes = [b.decode() for b in f["barcodes"][:]][::-1]  # another order than the file's
        genes = [g.decode() for g in f["genes"][:]][5:15]
    true = truth(slide, 8, barcodes, genes, 1e4)
    assert true.shape == (len(barcodes), 10) and np.isfinite(true).all()
    measured = np.random.default_rng(0).poisson(1.0, true.shape).astype(np.float32)
    pred = ad.AnnData(X=true.astype(np.float32), layers={"measured": measured})
    pred.obs_names, pred.var_names = barcodes, genes
    s = scores(pred, slide, 8, 1e4)
    assert s["vs_truth"] > 0.999 and abs(s["vs_measured"]) < 0.2
    pred.X = measured  # a model that predicts the noisy target itself
    s = scores(pred, slide, 8, 1e4)
    assert s["vs_measured"] > 0.999 and s["vs_truth"] < 0.5

"""The ridge probe (magnet/models/ridge.py): PCA + ridge in closed form against an independent computation, and
``model.name=ridge`` through the real training command on the tiny shards with cached bin features."""

import json

import numpy as np
import pytest
import scipy.linalg
from test_bin_features import _predict, _train

from magnet.models.ridge import fit_pca, fit_ridge


def test_ridge_recovers_a_known_linear_map():
    rng = np.random.default_rng(0)
    n, f, g = 400, 12, 5
    x = rng.normal(size=(n, f)) @ rng.normal(size=(f, f)) + 3.0  # correlated features, off-centre
    a, c = rng.normal(size=(f, g)), rng.normal(size=g)
    y = x @ a + c + 0.01 * rng.normal(size=(n, g))
    mean, proj = fit_pca(x, f)  # all components: the probe spans the features' space
    w, b = fit_ridge((x - mean) @ proj, y, 1e-9)
    pred = (x - mean) @ proj @ w + b
    # independent: least squares with an intercept column (scipy), no PCA
    coef = scipy.linalg.lstsq(np.c_[x, np.ones(n)], y)[0]
    assert np.allclose(pred, np.c_[x, np.ones(n)] @ coef, atol=1e-6)
    assert np.allclose(proj @ w, a, atol=0.01) and np.allclose(b - mean @ proj @ w, c, atol=0.05)
    # the penalty shrinks: whitened components, so each coefficient is scaled by 1 / (1 + alpha)
    w10, _ = fit_ridge((x - mean) @ proj, y, 10.0)
    assert np.allclose(w10, w / 11.0, rtol=1e-6, atol=1e-9)


def test_pca_keeps_the_leading_components():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 6)) * np.array([10.0, 5.0, 1.0, 0.5, 0.1, 0.01])
    mean, proj = fit_pca(x, 2)
    z = (x - mean) @ proj
    assert np.allclose(z.std(0), 1.0, atol=1e-6)  # unit variance per component
    assert np.allclose(np.abs(proj[:2] * np.array([[10.0], [5.0]])), np.eye(2), atol=0.1)


@pytest.mark.slow
def test_ridge_through_the_training_command_and_predict(feature_shards, tiny_cohort, tmp_path):
    from safetensors.torch import load_file

    from magnet.data.pipeline import ShardSet

    proc = _train(feature_shards, tmp_path, "r", "model.name=ridge")
    assert "ridge fitted" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["val"] and rows[0]["step"] == 0  # fitted: no SGD step, evaluated once
    # the registered weights are the closed-form fit on the training bins, with the recorded alpha
    w = load_file(str(tmp_path / "r" / "model" / "model.safetensors"))
    sset = ShardSet(str(feature_shards), 16, None, None, "features")
    samples = list(sset.reader("fail").read(u for u, _ in sset.shards("train")))
    x = np.concatenate([s["bin_feat"] for s in samples]).astype(np.float64)
    y = np.concatenate([s["bin_expr"] for s in samples]).astype(np.float64)
    mean, proj = fit_pca(x, w["proj"].shape[1])
    ref_w, ref_b = fit_ridge((x - mean) @ proj, y, float(w["alpha"]))
    pred = ((x - w["mean"].double().numpy()) @ w["proj"].double().numpy()) @ w["weight"].double().numpy()
    assert np.allclose(pred + w["bias"].double().numpy(), (x - mean) @ proj @ ref_w + ref_b, atol=1e-3)
    ad = _predict(tmp_path / "r" / "model", tiny_cohort, tmp_path / "p.h5ad")
    x_pred = ad.X.toarray() if hasattr(ad.X, "toarray") else np.asarray(ad.X)
    assert x_pred.shape[1] == y.shape[1] and np.isfinite(x_pred).all() and x_pred.std() > 0

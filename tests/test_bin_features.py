"""Cached bin features (issue 22): sharding stores each bin's frozen feature, ``model.bin_input=features`` trains
MagNet on them without decoding images, ``magnet predict`` computes them from the image with the shards' encoder,
and shards without them are refused."""

import json
import subprocess
import sys

import anndata
import numpy as np
import pytest
import torch

from conftest import REPO, train_env

from magnet.data.pipeline import ShardSet, TrainStream
from magnet.dist import WorldInfo
from magnet.errors import UserError
from magnet.train_config import DataConfig
from magnet.format.manifest import Manifest, manifest_path
from magnet.models.encoder import Encoder


def _first_sample(shards, skip=()):
    sset = ShardSet(str(shards), 16, None, None, "features" if skip else "image")
    return next(sset.reader("fail").read(u for u, _ in sset.shards("train")))


def test_sharding_writes_bin_features_and_records_the_encoder(feature_shards, tiny_shards):
    man = Manifest.load(manifest_path(feature_shards, 16))
    assert man.encoder["bin_features"] is True and man.encoder["name"] == "test_resnet"
    assert man.encoder["weights"] == "random-seed-0" and man.encoder["bin_input_px"] == 0
    s = _first_sample(feature_shards)
    feat = s["bin_feat"]
    assert feat.dtype == np.float16 and feat.shape == (s.n_bins, man.feat_dim)
    # independent: the frozen encoder (seed 0) on the bin patches cut from the stored image (clipped inside it)
    px = man.geometry.bin_px
    img = s["image"]
    x0 = np.clip(np.rint(s["bin_xy"][:, 0] - px / 2).astype(int), 0, img.shape[1] - px)
    y0 = np.clip(np.rint(s["bin_xy"][:, 1] - px / 2).astype(int), 0, img.shape[0] - px)
    patches = np.stack([img[y:y + px, x:x + px] for x, y in zip(x0, y0)])
    with torch.no_grad():
        ref = Encoder("test_resnet", None, seed=0).eval()(torch.from_numpy(patches).permute(0, 3, 1, 2)).numpy()
    assert np.allclose(feat.astype(np.float32), ref, atol=2e-3 * max(np.abs(ref).max(), 1.0))
    assert "bin_feat" not in _first_sample(tiny_shards)  # off by default


def test_features_stream_never_decodes_the_image(feature_shards, monkeypatch):
    def no_decode(data):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr("magnet.format.codec.decode_image", no_decode)
    cfg = DataConfig(shards=str(feature_shards), bin_um=16, micro_batch=2, max_bins=16, shuffle_buffer=4,
                     shuffle_initial=2, workers=0)
    sset = ShardSet.for_training(cfg, "features")
    batch = next(iter(TrainStream(sset, cfg, WorldInfo(0, 1, 0), 0, {"k_bin": 4, "k_spot": 4, "k_global": 4})))
    assert batch.bin_img is None
    assert batch.bin_feat.shape == (batch.num_bins, sset.manifest.feat_dim) and torch.isfinite(batch.bin_feat).all()


def test_shards_without_bin_features_are_refused_in_one_line(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="encoder.bin_features: these shards hold no bin features"):
        ShardSet(str(tiny_shards), 16, None, None, "features")
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.out_dir={tmp_path}", "train.run_name=r", "train.steps=2",
           "train.deepspeed=zero1", "model.bin_input=features"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "manifest.json: encoder.bin_features:" in err
    assert not (tmp_path / "r").exists()


def _train(shards, out, name, *overrides):
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={shards}", f"train.out_dir={out}", f"train.run_name={name}", "train.steps=2",
           "train.deepspeed=zero1", "model.bin_input=features", *overrides]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def _predict(model, tiny_cohort, out, *extra):
    cmd = [sys.executable, "-m", "magnet", "predict", "--model", str(model), "--spaceranger",
           str(tiny_cohort / "synth_001" / "outs"), "--image", str(tiny_cohort / "synth_001" / "synth_001_fullres.tif"),
           "--bin-um", "16", "--out", str(out), *extra, "progress=false"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return anndata.read_h5ad(out)


@pytest.mark.slow
def test_features_model_trains_registers_and_predicts(feature_shards, tiny_cohort, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    _train(feature_shards, tmp_path, "f", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
           "mlflow.register_as=feat", "mlflow.alias=champion")
    meta = json.loads((tmp_path / "f" / "model" / "model_meta.json").read_text())
    assert meta["encoder"]["bin_features"] is True  # the model records what computed its features
    ad = _predict("models:/feat@champion", tiny_cohort, tmp_path / "p.h5ad", "--tracking-uri", uri)
    n_bins = Manifest.load(manifest_path(feature_shards, 16)).slides["synth_001"]["bins_in_tissue"]
    x = ad.X.toarray() if hasattr(ad.X, "toarray") else np.asarray(ad.X)
    assert x.shape == (n_bins, len(meta["genes"])) and n_bins > 100 and np.isfinite(x).all() and x.std() > 0

"""The bin features' field (issue 22): ``encoder.field_sd_um`` stores, with each bin, the Gaussian-weighted mean of
the slide's cached bin features around it; ``model.field`` trains MagNet and the ridge probe on it, and ``magnet
predict`` computes it again from the image."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, train_env
from test_bin_features import _predict, _train

from magnet.batch import collate
from magnet.cli import main
from magnet.data.pipeline import ShardSet
from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.models.config import ModelConfig
from magnet.models.factory import create_model
from sharding.feature_field import feature_field

SD = [32.0, 64.0]


def brute_force(xy, feats, sd):
    """The Gaussian-weighted mean over every pair of bins, less the mean feature."""
    d2 = ((xy[:, None] - xy[None]) ** 2).sum(-1)
    w = np.exp(-d2 / (2 * sd ** 2))
    return w @ feats / w.sum(1, keepdims=True) - feats.mean(0)


@pytest.mark.parametrize("sd_um", [[32.0, 64.0], [128.0]])  # 16 um cells (one bin each); 32 um cells (4 bins)
def test_field_is_the_gaussian_weighted_mean_of_the_bins_around(sd_um):
    rng = np.random.default_rng(0)
    rc = np.argwhere(rng.random((40, 50)) < 0.7)  # a 16 um bin grid with holes (no tissue there)
    xy = rc[:, ::-1] * 16.0 + 8.0
    feats = rng.normal(size=(len(xy), 5)) + xy[:, :1] / 100  # a gradient across the slide, and noise
    field = feature_field(xy, feats.astype(np.float16), sd_um, 16)
    assert field.shape == (len(xy), len(sd_um), 5) and field.dtype == np.float16
    for k, sd in enumerate(sd_um):
        ref = brute_force(xy, feats.astype(np.float16).astype(np.float64), sd)
        assert np.abs(field[:, k] - ref).max() < 0.03 * np.abs(ref).max()
    # the mean counts tissue bins only: constant features give the slide's mean up to the tissue's edge (0 after it)
    const = feature_field(xy, np.full((len(xy), 3), 2.5, np.float16), sd_um, 16)
    assert np.abs(const.astype(np.float32)).max() < 2e-3


@pytest.fixture(scope="module")
def field_shards(tiny_cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("field_shards") / "tiny"
    argv = ["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
            "--config", str(REPO / "configs/shard/tiny.yaml"), "encoder.bin_features=true",
            f"encoder.field_sd_um=[{SD[0]},{SD[1]}]", "ray.num_cpus=1"]
    assert main(argv) == 0
    return out


def _slide_samples(shards, slide, field):
    sset = ShardSet(str(shards), 16, None, None, "features", field)
    urls = [u for split in ("train", "val", "test") if sset.manifest.has_split(split) for u, _ in sset.shards(split)]
    return [s for s in sset.reader("fail").read(urls) if s.meta.slide == slide], sset.manifest


def test_sharding_stores_the_field_of_the_slides_bin_features(field_shards, feature_shards):
    samples, man = _slide_samples(field_shards, "synth_001", 2)
    assert man.encoder["field_sd_um"] == SD and man.dims.L == 2
    plain, _ = _slide_samples(feature_shards, "synth_001", 0)
    # the bin features are those of the shards without a field, byte for byte
    assert [s["bin_feat"].tobytes() for s in samples] == [s["bin_feat"].tobytes() for s in plain]
    assert all("bin_field" not in s for s in plain)
    # without a field, the manifest records the config as shards written before the field existed (same plan)
    plain_man = Manifest.load(manifest_path(feature_shards, 16))
    assert "field_sd_um" not in plain_man.encoder and "field_sd_um" not in plain_man.extra["config"]["encoder"]
    assert man.extra["config"]["encoder"]["field_sd_um"] == SD
    feats = np.concatenate([s["bin_feat"] for s in samples]).astype(np.float64)
    field = np.concatenate([s["bin_field"] for s in samples]).astype(np.float64)
    assert field.shape == (len(feats), 2, man.feat_dim)
    # independent: slide positions in um from each sample's tile and the bins' tile-local pixels
    g = man.geometry
    margin = (g.image_px - g.global_px) / 2
    xy = np.concatenate([(np.array([s.meta.gx, s.meta.gy]) * g.global_px - margin + s["bin_xy"]) * g.mpp
                         for s in samples])
    for k, sd in enumerate(SD):
        ref = brute_force(xy, feats, sd)
        err = np.abs(field[:, k] - ref)  # the slide's bins lie off an exact 16 um grid: a cell may hold 2 of them
        assert np.percentile(err, 99) < 0.06 * np.abs(ref).max() and err.max() < 0.15 * np.abs(ref).max(), sd
    # the field is not the bin's own feature: at 64 um it is smoother across the slide
    assert field[:, 1].std(0).mean() < feats.std(0).mean()
    # a model that does not read it never decodes it
    assert all("bin_field" not in s for s in _slide_samples(field_shards, "synth_001", 0)[0])


def _model(field, feat_dim, geometry, seed=0):
    cfg = ModelConfig(name="magnet", bin_input="features", field=field, width=32, heads=2, gat_layers=1,
                      k_bin=4, k_spot=4, k_global=4)
    torch.manual_seed(seed)
    return create_model(cfg, 5, feat_dim, geometry)


def test_magnet_reads_the_field_on_its_context_path(field_shards):
    samples, man = _slide_samples(field_shards, "synth_001", 2)
    batch = collate(samples[:2], man.geometry, k_bin=4, k_spot=4, k_global=4)
    assert batch.bin_field.shape == (batch.num_bins, 2 * man.feat_dim)
    other = dataclasses.replace(batch, bin_field=batch.bin_field.flip(0))  # each bin given another bin's field
    model = _model(2, man.feat_dim, man.geometry).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.heads["bin"][-1].weight)  # the context head starts at zero: open it
        assert not torch.allclose(model(batch).bin, model(other).bin)  # the field changes the prediction ...
        model.heads["bin"][-1].weight.zero_()
        assert torch.equal(model(batch).bin, model(other).bin)  # ... through the context head alone
    with pytest.raises(UserError, match="bin_field: missing"):
        model(dataclasses.replace(batch, bin_field=None))
    with pytest.raises(ValueError, match="stnet does not"):  # a model that would ignore it refuses it
        ModelConfig(name="stnet", bin_input="features", field=2)


def test_a_field_the_shards_do_not_hold_is_refused_in_one_line(field_shards, feature_shards, tmp_path):
    with pytest.raises(UserError, match="encoder.field_sd_um: these shards hold the bin features' field at 0 scales"):
        ShardSet(str(feature_shards), 16, None, None, "features", 2)
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={field_shards}", f"train.out_dir={tmp_path}", "train.run_name=r", "train.steps=2",
           "train.deepspeed=zero1", "model.bin_input=features", "model.field=3"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "manifest.json: encoder.field_sd_um:" in err and "model.field=2" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["magnet", "ridge"])
def test_field_models_train_register_and_predict_from_the_image(name, field_shards, tiny_cohort, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    _train(field_shards, tmp_path, name, f"model.name={name}", "model.field=2", "mlflow.enabled=true",
           f"mlflow.tracking_uri={uri}", f"mlflow.register_as=field-{name}", "mlflow.alias=champion")
    meta = json.loads((tmp_path / name / "model" / "model_meta.json").read_text())
    assert meta["encoder"]["field_sd_um"] == SD  # the model records the scales its field was computed at
    # magnet predict recomputes the bin features and their field from the image, in a fresh process
    ad = _predict(f"models:/field-{name}@champion", tiny_cohort, tmp_path / "p.h5ad", "--tracking-uri", uri)
    n_bins = Manifest.load(manifest_path(field_shards, 16)).slides["synth_001"]["bins_in_tissue"]
    x = ad.X.toarray() if hasattr(ad.X, "toarray") else np.asarray(ad.X)
    assert x.shape == (n_bins, len(meta["genes"])) and np.isfinite(x).all() and x.std() > 0
    # the field computed again from the image is the shards': the registry model on the shards' samples of the
    # slide gives the h5ad's values
    import mlflow

    mlflow.set_tracking_uri(uri)
    pm = mlflow.pyfunc.load_model(f"models:/field-{name}@champion").unwrap_python_model()
    row = {(r, c): i for i, (r, c) in enumerate(zip(ad.obs["array_row"], ad.obs["array_col"]))}
    samples, _ = _slide_samples(field_shards, "synth_001", 2)
    m = pm.config.model
    for s in samples[:4]:
        out = pm.predict_batch(collate([s], pm.geometry, k_bin=m.k_bin, k_spot=m.k_spot, k_global=m.k_global))
        idx = [row[tuple(rc)] for rc in s["bin_rc"].tolist()]
        np.testing.assert_allclose(x[idx], out["bin"], rtol=1e-4, atol=1e-4)

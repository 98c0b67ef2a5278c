"""Frozen encoders at every level (issue 22): a trained model's bin encoder as the sharding stage's frozen
encoder (the two-stage chain), and a timm architecture with weights from a local file, as offline users load
a foundation model, at the spot/global, cached-bin and end-to-end bin levels."""

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO
from test_bin_features import _train

from magnet.cli import main
from magnet.errors import UserError
from magnet.format.manifest import Manifest, manifest_path
from magnet.geometry import Geometry
from magnet.models.config import ModelConfig
from magnet.models.encoder import IMAGENET_MEAN, IMAGENET_STD, Encoder, weights_id
from magnet.models.factory import create_model
from sharding.config import EncoderConfig
from sharding.features import FeatureExtractor


@pytest.mark.slow
def test_a_trained_models_bin_encoder_becomes_the_frozen_encoder(registered, tiny_cohort, tiny_shards, tmp_path):
    uri, run = registered  # tiny@champion: trained end to end on tiny_shards (stage 1)
    out = tmp_path / "tuned"
    argv = ["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
            "--config", str(REPO / "configs/shard/tiny.yaml"), "encoder.weights=models:/tiny@champion",
            f"encoder.tracking_uri={uri}", "encoder.bin_features=true", "ray.num_cpus=1"]
    assert main(argv) == 0  # stage 2: re-shard with its bin encoder
    enc = Manifest.load(manifest_path(out, 16)).encoder
    exported = out / "tuned_encoder.safetensors"
    assert enc["weights_source"] == "models:/tiny@champion" and enc["weights"] == weights_id(str(exported), 0)
    trained = load_file(str(run / "model" / "model.safetensors"))
    tensors = load_file(str(exported))
    assert tensors and all(torch.equal(v, trained[f"encoder.backbone.{k}"]) for k, v in tensors.items())
    assert len(tensors) == sum(k.startswith("encoder.backbone.") for k in trained)
    # the features are the tuned encoder's, not the random one's of the first shards
    first = json.loads((tiny_shards / "16um" / "manifest.json").read_text())["encoder"]["weights"]
    assert first.startswith("random-seed-") and enc["weights"] != first
    _train(out, tmp_path, "f")  # stage 3: train on its features
    assert (tmp_path / "f" / "model" / "model.safetensors").is_file()


def test_a_features_model_is_no_encoder_source(tiny_cohort, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.yaml").write_text("config:\n  model:\n    name: magnet\n    bin_input: features\n")
    save_file({"bin_proj.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    argv = ["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out",
            str(tmp_path / "s"), "--config", str(REPO / "configs/shard/tiny.yaml"), f"encoder.weights={folder}"]
    assert main(argv) == 2
    assert not (tmp_path / "s").exists()


def test_local_weights_file_at_every_level(tmp_path):
    """A timm architecture name plus a local weights file (here made from ``pretrained=False`` with another seed,
    as a foundation model's checkpoint would be downloaded once and copied): the same weights at every level."""
    torch.manual_seed(123)
    src = timm.create_model("test_resnet", pretrained=False, num_classes=0).eval()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = src((x.float() / 255 - mean) / std)
        # the one builder (magnet.models.encoder.Encoder) loads it ...
        enc = Encoder("test_resnet", str(path), seed=0).eval()
        assert enc.weights_id == weights_id(str(path), 0) and torch.allclose(enc(x), ref, atol=1e-5)
        assert not torch.allclose(Encoder("test_resnet", None, seed=0).eval()(x), ref, atol=1e-3)
        # ... for the spot / global (and cached bin) features of the sharding stage ...
        geom = Geometry(mpp=0.5, global_px=64, spot_px=32, bin_px=32)
        fx = FeatureExtractor(EncoderConfig(name="test_resnet", weights=str(path), input_px=0), geom, 0, 1)
        img = np.random.default_rng(0).integers(0, 256, (geom.image_px, geom.image_px, 3), dtype=np.uint8)
        xy = np.array([[geom.image_px / 2, geom.image_px / 2]], np.float32)
        patch = torch.from_numpy(img[geom.image_px // 2 - 16:geom.image_px // 2 + 16,
                                     geom.image_px // 2 - 16:geom.image_px // 2 + 16]).permute(2, 0, 1)[None]
        bin_ref = src((patch.float() / 255 - mean) / std).numpy()
        assert np.allclose(fx.bins(img, xy).astype(np.float32), bin_ref, atol=2e-3 * max(np.abs(bin_ref).max(), 1))
        # ... and for the bin level trained end to end (model.encoder_weights)
        cfg = ModelConfig(name="stnet", encoder="test_resnet", encoder_weights=str(path), width=8, heads=2)
        model = create_model(cfg, 4, fx.dim, geom)
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in model.encoder.backbone.state_dict().items())


def test_a_weights_file_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    state = timm.create_model("test_resnet", pretrained=False, num_classes=0).state_dict()
    save_file({k: v.contiguous() for k, v in list(state.items())[:-3]}, str(path))  # tensors left out
    with pytest.raises(UserError, match="does not fit timm model 'test_resnet' [(]missing"):
        Encoder("test_resnet", str(path))
    state["blocks.0.ls1.gamma"] = torch.ones(4)  # e.g. a ViT checkpoint with layer scale, built without it
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(UserError, match="unexpected 'blocks.0.ls1.gamma'"):
        Encoder("test_resnet", str(path))


def test_the_sharding_stage_names_its_own_encoder_keys(tmp_path):
    """A weights file of another model, given to the sharding stage, is refused naming encoder.name and
    encoder.weights (the keys the user set), not the training config's model.encoder."""
    path = tmp_path / "resnet.safetensors"
    save_file({"other.weight": torch.ones(2)}, str(path))
    with pytest.raises(UserError, match=r"no tensor matches model 'test_resnet' \(keys encoder.name, "
                                        r"encoder.weights\)"):
        FeatureExtractor(EncoderConfig(name="test_resnet", weights=str(path), input_px=0),
                         Geometry(mpp=0.5, global_px=64, spot_px=32, bin_px=32), 0, 1)


def test_a_foundation_style_vit_loads_with_its_constructor_arguments(tmp_path):
    """As UNI loads offline (``vit_large_patch16_224`` + ``init_values``, ``dynamic_img_size``): here timm's
    ``test_vit`` with layer scale, from a local file, at the sharding stage and at the end-to-end bin level."""
    kw = {"init_values": 1e-5, "dynamic_img_size": True}
    torch.manual_seed(5)
    src = timm.create_model("test_vit", pretrained=False, num_classes=0, **kw).eval()
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    with pytest.raises(UserError, match="unexpected 'blocks.0.ls1.gamma'"):
        Encoder("test_vit", str(path), kwargs={"dynamic_img_size": True})  # built without layer scale
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    geom = Geometry(mpp=0.5, global_px=64, spot_px=32, bin_px=32)
    with torch.no_grad():
        ref = src((x.float() / 255 - mean) / std)
        fx = FeatureExtractor(EncoderConfig(name="test_vit", weights=str(path), input_px=0, kwargs=kw), geom, 0, 1)
        assert torch.allclose(fx.encoder(x), ref, atol=1e-4)
        model = create_model(ModelConfig(name="stnet", encoder="test_vit", encoder_weights=str(path),
                                         encoder_kwargs=kw, width=8, heads=2), 4, fx.dim, geom).eval()
        assert torch.allclose(model.encoder(x), ref, atol=1e-4)

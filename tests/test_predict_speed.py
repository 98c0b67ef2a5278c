"""Prediction speed settings (magnet/models/inference.py) change nothing beyond fp32 rounding: batch norms
folded into convolutions (timm ResNet and RegNet, whose norm layers carry the activation), channels-last,
torch.compile, and the whole `magnet predict` output with and without them, and whatever the batch size."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from magnet.cli import main
from magnet.models.encoder import Encoder
from magnet.models.inference import fold_batch_norms, for_inference


def _randomise_norms(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)


@pytest.mark.parametrize("name", ["test_resnet", "regnetx_002"])
def test_folded_encoder_computes_the_same(name):
    enc = Encoder(name, None, seed=0, channels_last=False).eval()
    _randomise_norms(enc)
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = enc(x)
    fast = copy.deepcopy(enc)
    holder = nn.Module()
    holder.encoder = fast
    done = for_inference(holder, encoder_batch=2, input_px=64)  # 3 images: calls of 2 and 1
    assert done["folded_batch_norms"] > 5 and done["channels_last"] and done["encoder_batch"] == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.backbone.modules())
    pixels = (x * 255).round()
    with torch.inference_mode():
        out = fast(x)
        from_bytes, from_floats = fast(pixels.to(torch.uint8)), fast(pixels / 255)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_bytes, from_floats, rtol=0, atol=0)  # uint8 input: scaled to [0, 1] first
    assert for_inference(holder) is done  # a second slide of a cohort worker: prepared once


def test_a_pair_the_forward_does_not_apply_in_that_order_is_not_folded():
    class PreActivation(nn.Module):  # bn1 comes before conv1 here, despite the names
        def __init__(self):
            super().__init__()
            self.bn1 = nn.BatchNorm2d(4)
            self.conv1 = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return self.conv1(self.bn1(x))

    m = PreActivation().eval()
    _randomise_norms(m)
    out, n = fold_batch_norms(m, torch.rand(2, 4, 8, 8))
    assert n == 0 and out is m


def test_compiled_encoder_computes_the_same():
    enc = Encoder("test_resnet", None, seed=0, channels_last=False).eval()
    _randomise_norms(enc)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref = enc(x)
    holder = nn.Module()
    holder.encoder = enc
    assert for_inference(holder, compile=True, input_px=32)["compiled"]
    with torch.inference_mode():
        out = enc(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_prediction_with_and_without_the_speed_settings(registered, tiny_cohort, tmp_path):
    import anndata as ad

    _, run_dir = registered
    slide = tiny_cohort / "synth_000"
    common = ["predict", "--model", str(run_dir / "model"), "--spaceranger", str(slide / "outs"), "--image",
              str(slide / "synth_000_fullres.tif")]
    assert main(common + ["--out", str(tmp_path / "fast.h5ad"), "progress=false"]) == 0
    assert main(common + ["--out", str(tmp_path / "plain.h5ad"), "progress=false", "fold_bn=false",
                          "channels_last=false"]) == 0
    fast, plain = ad.read_h5ad(tmp_path / "fast.h5ad"), ad.read_h5ad(tmp_path / "plain.h5ad")
    assert list(fast.obs_names) == list(plain.obs_names)
    np.testing.assert_allclose(fast.X, plain.X, rtol=1e-4, atol=1e-5)
    for level in ("spot", "global"):
        np.testing.assert_allclose(fast.uns["magnet"][level]["X"], plain.uns["magnet"][level]["X"], rtol=1e-4,
                                   atol=1e-5)


def test_prediction_does_not_depend_on_the_batch_size(registered, tiny_cohort, tmp_path):
    """One chunk per forward pass, three, or about 512 bins: the same outputs up to fp32 rounding (the bin graph
    is built within each chunk, so the chunks a pass holds do not change a bin's neighbours)."""
    import anndata as ad

    _, run_dir = registered
    slide = tiny_cohort / "synth_000"
    common = ["predict", "--model", str(run_dir / "model"), "--spaceranger", str(slide / "outs"), "--image",
              str(slide / "synth_000_fullres.tif")]
    outs = []
    for i, setting in enumerate(["batch_size=1", "batch_size=3", "batch_bins=512"]):
        assert main(common + ["--out", str(tmp_path / f"{i}.h5ad"), "progress=false", setting]) == 0
        outs.append(ad.read_h5ad(tmp_path / f"{i}.h5ad"))
    ref = outs[0]
    assert ref.n_obs > 4 * 32  # more chunks than the smallest pass holds
    for other in outs[1:]:
        assert list(other.obs_names) == list(ref.obs_names)
        np.testing.assert_allclose(other.X, ref.X, rtol=1e-5, atol=1e-5)
        for level in ("spot", "global"):
            np.testing.assert_allclose(other.uns["magnet"][level]["X"], ref.uns["magnet"][level]["X"], rtol=1e-5,
                                       atol=1e-5)

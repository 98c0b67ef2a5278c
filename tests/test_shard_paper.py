"""configs/shard/paper.yaml: the paper's physical field of view parses, validates and shards."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magnet.cli import main
from magnet.config import load_config
from sharding.config import ShardConfig
from magnet.format.codec import decode_npy
from test_shard import samples

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs/shard/paper.yaml"


def test_paper_field_of_view_in_microns():
    cfg = load_config(ShardConfig, PAPER, [])
    s = cfg.shard
    assert (s.bin_px, s.spot_px, s.global_px) == (112, 224, 512) and 0.25 <= s.mpp <= 0.27
    assert s.bin_px * s.mpp == pytest.approx(30, abs=2) and s.spot_px * s.mpp == pytest.approx(60, abs=4)
    assert s.global_px * s.mpp == pytest.approx(140, abs=12)
    assert (cfg.encoder.name, cfg.encoder.input_px, cfg.genes.n_genes) == ("resnet50", 224, 250)
    assert cfg.shard.geometry().n_spots == 4  # 2 x 2 spot tiles per global tile


def test_paper_layout_shards_the_tiny_cohort(tiny_cohort, tmp_path, capsys):
    """Smoke at the paper's geometry (a small frozen encoder instead of ResNet-50, to stay fast)."""
    out = tmp_path / "paper"
    assert main(["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
                 "--config", str(PAPER), "encoder.name=regnetx_002", "genes.n_genes=40", "ray.num_cpus=1",
                 "ray.progress=false"]) == 0
    assert main(["shard", "validate", str(out / "16um")]) == 0
    capsys.readouterr()
    manifest = json.loads((out / "16um" / "manifest.json").read_text())
    assert manifest["config"]["shard"]["mpp"] == 0.27 and len(manifest["genes"]) == 40
    got = list(samples(out / "16um"))
    assert got
    for _, m in got[:3]:
        assert json.loads(m["meta.json"])["n_bins"] > 0
        assert Image.open(io.BytesIO(m["image.jpg"])).size == (512 + 112, 512 + 112)  # tile + 2 x margin
        assert np.isfinite(decode_npy(m["bin_expr.npy.zst"])).all()

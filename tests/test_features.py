"""The frozen encoder's features (sharding/features.py): batch norms folded and small calls give the features
of the plain encoder; ``encoder.precision=bf16`` is recorded in the manifest and used again by prediction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from magnet.cli import main
from magnet.format.codec import decode_npy
from magnet.geometry import Geometry
from sharding.config import EncoderConfig
from sharding.features import FeatureExtractor

REPO = Path(__file__).resolve().parents[1]


def _tiles(n: int, geom: Geometry) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (geom.image_px, geom.image_px, 3), dtype=np.uint8) for _ in range(n)]


def test_folded_encoder_in_small_calls_gives_the_plain_encoders_features():
    from magnet.models.encoder import Encoder

    geom = Geometry(global_px=256, spot_px=128, bin_px=64)
    tiles = _tiles(5, geom)
    ex = FeatureExtractor(EncoderConfig(batch_size=3), geom, seed=0, threads=1)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ex.encoder.backbone.modules())
    spot, glob = ex(tiles)
    assert spot.shape == (5, geom.n_spots, ex.dim) and glob.shape == (5, ex.dim)

    plain = Encoder("regnetx_002", None, seed=0).eval()  # batch norms in place, every image in one call
    p, m, g = geom.spot_px, geom.margin, geom.global_px
    crops = np.stack([t[y:y + p, x:x + p] for t in tiles for x, y in ex.boxes])
    with torch.inference_mode():
        ref_spot = plain(torch.from_numpy(crops).permute(0, 3, 1, 2)).numpy().reshape(spot.shape)
    scale = np.abs(ref_spot).max()
    np.testing.assert_allclose(spot.astype(np.float32), ref_spot, rtol=0, atol=2e-3 * scale)

    bf16 = FeatureExtractor(EncoderConfig(batch_size=3, precision="bf16"), geom, seed=0, threads=1)
    spot16, glob16 = bf16(tiles)
    diff = np.abs(spot16.astype(np.float32) - spot.astype(np.float32))
    assert diff.max() > 0  # bf16 arithmetic, not fp32
    assert diff.max() < 0.1 * scale and np.corrcoef(glob16.ravel(), glob.ravel())[0, 1] > 0.99


def test_bf16_features_are_recorded_in_the_manifest_and_used_by_prediction(tiny_cohort, tiny_shards, registered,
                                                                           tmp_path):
    from magnet.data.pipeline import ShardSet
    from magnet.predict.config import PredictConfig
    from magnet.predict.model import load_model
    from magnet.predict.slide import shard_config

    out = tmp_path / "bf16"
    assert main(["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
                 "--config", str(REPO / "configs/shard/tiny.yaml"), "encoder.precision=bf16", "ray.num_cpus=1",
                 "ray.progress=false"]) == 0
    man = json.loads((out / "16um" / "manifest.json").read_text())
    assert man["encoder"]["precision"] == "bf16"
    assert json.loads((tiny_shards / "16um" / "manifest.json").read_text())["encoder"]["precision"] == "fp32"

    def features(folder: Path) -> dict:
        m = json.loads((folder / "16um" / "manifest.json").read_text())
        urls = [str(folder / "16um" / s["name"]) for s in m["shards"]]
        return {(s.meta.slide, s.meta.gx, s.meta.gy): s["global_feat"][0].astype(np.float32)
                for s in ShardSet(str(folder), 16, None, None).reader("fail").read(urls)}

    fp32, bf16 = features(tiny_shards), features(out)
    assert fp32.keys() == bf16.keys()
    a, b = np.stack(list(fp32.values())), np.stack([bf16[k] for k in fp32])
    assert not np.array_equal(a, b) and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99

    uri, _ = registered
    model = load_model("models:/tiny@champion", uri)
    assert shard_config(model, PredictConfig()).encoder.precision == "fp32"
    as_bf16 = dataclasses.replace(model, encoder={**model.encoder, "precision": "bf16"})
    assert shard_config(as_bf16, PredictConfig()).encoder.precision == "bf16"
    legacy = dataclasses.replace(model, encoder={k: v for k, v in model.encoder.items() if k != "precision"})
    assert shard_config(legacy, PredictConfig()).encoder.precision == "fp32"

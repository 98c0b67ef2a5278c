"""bench/feature_probe.py: bin-only read-outs of cached bin features, on real feature shards and on data whose
answer is known; the mean over the 8 views is the same for a patch and its rotation."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from magnet.format.manifest import Manifest
from sharding.config import EncoderConfig
from sharding.features import FeatureExtractor

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("feature_probe", REPO / "bench" / "feature_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_load_reads_the_stored_features_and_aligns_a_folder_with_itself(feature_shards):
    folder = feature_shards / "16um"
    data = probe.load(folder)
    splits = json.loads((folder / "manifest.json").read_text())["splits"]
    assert set(data) == {s for s, split in splits.items() if split in ("train", "val")}
    for slide, d in data.items():
        assert d["split"] == splits[slide] and len(d["feat"]) == len(d["expr"]) == len(d["pos"]) > 0
        assert np.isfinite(d["feat"]).all() and d["feat"].std() > 0
    shuffled = {s: {**d, **{m: d[m][::-1] for m in ("feat", "expr", "pos")}} for s, d in data.items()}
    back = probe.align(data, shuffled)
    for slide in data:
        np.testing.assert_array_equal(back[slide]["feat"], data[slide]["feat"])


def test_the_mean_over_the_8_views_does_not_change_when_the_patch_turns(feature_shards):
    typed = Manifest.load(feature_shards / "16um" / "manifest.json")
    enc = typed.to_dict()["encoder"]
    extractor = FeatureExtractor(EncoderConfig(name=enc["name"], input_px=enc["input_px"]), typed.geometry,
                                 seed=typed.to_dict()["seed"], threads=1)
    patches = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    views = probe.dihedral(patches)
    assert len({v.tobytes() for v in views}) == 8 and np.array_equal(views[0], patches)
    turned = np.ascontiguousarray(np.rot90(patches, 1, axes=(1, 2))[:, ::-1])
    np.testing.assert_allclose(probe.view_mean(extractor, turned), probe.view_mean(extractor, patches), atol=2e-3)
    assert not np.allclose(extractor.encode(turned), extractor.encode(patches), atol=2e-3)


def _linear_slides(rng: np.random.Generator, n_genes: int):
    """4 slides (3 training, 1 validation) of 300 bins whose genes are a linear map of 6 features, little noise."""
    w = rng.standard_normal((6, n_genes))
    feats, expr = {}, {}
    for name in ("a", "b", "c", "v"):
        feats[name] = rng.standard_normal((300, 6))
        expr[name] = feats[name] @ w + 0.1 * rng.standard_normal((300, n_genes))
    return feats, expr, {"a": "train", "b": "train", "c": "train", "v": "val"}


def test_ridge_and_mlp_read_what_the_features_hold():
    rng = np.random.default_rng(0)
    feats, expr, splits = _linear_slides(rng, 4)
    text = probe.score(feats, expr, splits, mlp=True)
    ridge, mlp = float(text.split()[3]), float(text.split()[5])
    assert ridge > 0.95 and mlp > 0.8
    noise = {k: rng.standard_normal((300, 6)) for k in feats}
    assert abs(float(probe.score(noise, expr, splits, mlp=False).split()[3])) < 0.2
    with pytest.raises(SystemExit, match="need 2 or more"):
        probe.score(feats, expr, {"a": "train", "b": "test", "c": "test", "v": "val"}, mlp=False)


def _wave_slides(seed: int, slide_offset: float = 0.0):
    """4 slides (3 training, 1 validation) of 30 x 30 bins whose 2 genes follow a smooth wave over the slide, which
    each bin's feature 0 holds under heavy noise; ``slide_offset``: and every feature a slide-wide offset."""
    rng = np.random.default_rng(seed)
    data, expr = {}, {}
    for name, split in (("a", "train"), ("b", "train"), ("c", "train"), ("v", "val")):
        pos = np.stack(np.meshgrid(np.arange(30), np.arange(30)), -1).reshape(-1, 2) * 32.0  # px, 16 um at 0.5
        field = rng.standard_normal(4)
        wave = np.sin(pos @ field[:2] / 150 + field[2])
        feat = rng.standard_normal((len(pos), 40))
        if slide_offset:
            feat += slide_offset * rng.standard_normal(40)
        feat[:, 0] += wave + 2 * rng.standard_normal(len(pos))
        data[name] = {"split": split, "feat": feat, "pos": pos}
        expr[name] = np.stack([wave, -wave], 1) + 0.1 * rng.standard_normal((len(pos), 2))
    return data, expr


def test_the_neighbours_mean_reads_what_only_the_neighbourhood_holds():
    data, expr = _wave_slides(0)
    alone, both = probe.with_neighbours(data, 0.5, [64.0])
    assert alone["v"].shape == (900, probe.NEIGHBOUR_PCA) and both["v"].shape == (900, 2 * probe.NEIGHBOUR_PCA)
    splits = {k: d["split"] for k, d in data.items()}
    bin_alone = float(probe.score(alone, expr, splits, mlp=False).split()[3])
    with_discs = float(probe.score(both, expr, splits, mlp=False).split()[3])
    assert with_discs > bin_alone + 0.2
    _, near = probe.with_neighbours(data, 0.5, [17.0])  # 17 um at 0.5 um/px: the bin and its 4 neighbours 16 um away
    k = 15 * 30 + 15
    expected = alone["v"][[k, k - 1, k + 1, k - 30, k + 30]].mean(0)
    np.testing.assert_allclose(near["v"][k, probe.NEIGHBOUR_PCA:], expected, atol=1e-9)


def test_the_field_reads_what_only_the_neighbourhood_holds_and_drops_the_slide_mean():
    data, expr = _wave_slides(1, slide_offset=5.0)
    splits = {k: d["split"] for k, d in data.items()}
    alone = probe.components(data)
    centred = probe.with_field(data, 0.5, [32.0, 64.0], 16)
    whole = probe.with_field(data, 0.5, [32.0, 64.0], 16, whole=True)
    assert centred["v"].shape == (900, 3 * probe.NEIGHBOUR_PCA)
    n = probe.NEIGHBOUR_PCA
    assert np.abs(centred["v"][:, n:].mean(0)).max() < 0.05 * np.abs(alone["v"].mean(0)).max()  # no slide mean
    assert np.abs(whole["v"][:, n:].mean(0) - np.tile(alone["v"].mean(0), 2)).max() < 0.05  # kept whole: the mean
    bin_alone = float(probe.score(alone, expr, splits, mlp=False).split()[3])
    with_field = probe.score(centred, expr, splits, mlp=False, group=np.array(["up", "down"]))
    assert float(with_field.split()[3]) > bin_alone + 0.2 and "(down " in with_field and ", up " in with_field


def test_by_type_scores_each_types_markers_from_the_ridge():
    rng = np.random.default_rng(2)
    feats, expr, splits = _linear_slides(rng, 3)
    for name in expr:
        expr[name][:, 2] = rng.standard_normal(300)  # the macrophage marker: nothing in the features holds it
    text = probe.score(feats, expr, splits, mlp=False, types={"tumour": np.array([0, 1]), "macrophage": np.array([2])})
    first, line = text.split("\n")
    assert first == probe.score(feats, expr, splits, mlp=False)
    values = dict(part.rsplit(" ", 1) for part in line.split(": ", 1)[1].split(", "))
    assert set(values) == {"tumour", "macrophage"}
    assert float(values["tumour"]) > 0.95 and abs(float(values["macrophage"])) < 0.2

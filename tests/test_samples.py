"""The slide-to-samples iterator (sharding/samples.py), called in this process, against what ``magnet shard``
(conftest ``tiny_shards``, on Ray workers) wrote; and the Space Ranger layout's names against a synthetic slide."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from magnet.config import config_from_saved
from magnet.format.codec import encode_sample
from magnet.spaceranger_layout import Outs
from sharding.samples import FeatureExtractor, Level, ShardConfig, SlideImage, read_genes, slide_samples

SLIDE = "synth_000"


def _members(folder: Path, slide: str) -> dict[str, dict[str, bytes]]:
    """Every member of ``slide``'s shards in ``folder``, by sample key and member suffix."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in json.loads((folder / "manifest.json").read_text())["shards"]:
        if shard["slide"] == slide:
            with tarfile.open(folder / shard["name"]) as tar:
                for info in tar:
                    key, suffix = info.name.split(".", 1)
                    out.setdefault(key, {})[suffix] = tar.extractfile(info).read()
    return out


def test_the_iterator_yields_the_shards_members_byte_for_byte(tiny_shards, tiny_cohort):
    """One slide at 8 and 16 um: every sample the iterator yields, encoded as the shard writer encodes it, is
    the slide's shard members byte for byte, and the shards hold no other sample of the slide."""
    cfg = config_from_saved(ShardConfig, tiny_shards / "shard_config.yaml")
    outs = Outs.find(tiny_cohort / SLIDE)
    manifests = {b: json.loads((tiny_shards / f"{b}um" / "manifest.json").read_text()) for b in (8, 16)}
    ids, _ = read_genes(outs.bin_matrix(8))
    genes = np.array([ids.index(g) for g in manifests[8]["gene_ids"]], np.int64)
    extractor = FeatureExtractor(cfg.encoder, cfg.shard.geometry(), cfg.seed, 1)
    blocks = []
    with SlideImage(tiny_cohort / SLIDE / f"{SLIDE}_fullres.tif") as image:
        levels = {b: Level.read(outs.path, b, image, genes, cfg) for b in (8, 16)}
        with slide_samples(SLIDE, image, levels, cfg, extractor, block=5, progress=blocks.append) as samples:
            assert sum(blocks) == len(samples.grid) and blocks[0] == 5  # every tile once, in blocks of 5
            for b in (8, 16):
                stored = _members(tiny_shards / f"{b}um", SLIDE)
                mine = {}
                for item in samples.samples(b, manifests[b]["splits"][SLIDE]):
                    raw = encode_sample(item.sample, item.image, cfg.shard.image_format)
                    mine[raw.pop("__key__")] = raw
                    np.testing.assert_array_equal(levels[b].bins.rc[item.bins], item.sample["bin_rc"])
                assert len(mine) == len(levels[b].tiles.grid) > 3
                assert mine == stored, f"{b} um"


def test_the_layout_names_a_synthetic_slides_files(tiny_cohort):
    outs = Outs.find(tiny_cohort / SLIDE)
    assert outs.path == Outs.find(outs.path).path == tiny_cohort / SLIDE / "outs"
    for b in (2, 8, 16):
        assert outs.binned(b).name == f"square_{b:03d}um"
        for path in (outs.bin_matrix(b), outs.bin_raw_matrix(b), outs.bin_positions(b), outs.bin_scalefactors(b)):
            assert path.is_file(), path
        for kind in Outs.IMAGES:
            assert Outs.image(outs.bin_spatial(b), kind).is_file()
    assert outs.feature_slice.is_file() and (outs.spatial / Outs.SCALEFACTORS).is_file()
    assert outs.cell_segmentations == outs.path / "segmented_outputs" / "cell_segmentations.geojson"

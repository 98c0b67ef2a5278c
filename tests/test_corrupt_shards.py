"""Corrupted copies of the tiny 16 um shards (truncated, a flipped byte in a member, a member dropped,
an unsafe member name): `magnet shard validate` finds each, and the loader's `data.on_corrupt`
policy fails with one line naming shard and member, or skips the samples with a warning and a count."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from magnet.cli import main
from magnet.data.pipeline import EvalStream, ShardSet, TrainStream
from magnet.dist import WorldInfo
from magnet.errors import UserError
from magnet.train_config import DataConfig
from shard_damage import corrupt, rehash

KNN = {"k_bin": 4, "k_spot": 3, "k_global": 3}
ONE = WorldInfo(rank=0, world_size=1, local_rank=0)
VAL = "val-000001.tar"


@pytest.fixture()
def shards(tiny_shards, tmp_path) -> Path:
    """A writable copy of the 16 um shard folder, under ``tmp_path/16um``."""
    shutil.copytree(tiny_shards / "16um", tmp_path / "16um")
    return tmp_path


def _cfg(root: Path, policy: str) -> DataConfig:
    return DataConfig(shards=str(root), bin_um=16, micro_batch=2, eval_batch=4, max_bins=8, shuffle_buffer=4,
                      shuffle_initial=2, workers=0, on_corrupt=policy)


def _eval(root: Path, policy: str) -> list:
    cfg = _cfg(root, policy)
    return list(EvalStream(ShardSet(cfg.shards, 16, None, None), cfg, ONE, "val", KNN))


def _keys(batches) -> set[tuple]:
    return {(b.slides[int(s)], tuple(g)) for b in batches for s, g in zip(b.sample_slide, b.sample_grid.tolist())}


@pytest.mark.parametrize("kind", ["truncate", "flip_npy", "flip_jpg", "drop", "unsafe_name"])
def test_shard_validate_finds_the_damage(shards, kind, capsys):
    corrupt(shards / "16um" / VAL, kind)
    assert main(["shard", "validate", str(shards / "16um")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{VAL}: " in err
    assert ("bytes:" in err) if kind == "truncate" else ("sha256:" in err or "bytes:" in err)


@pytest.mark.parametrize("kind, member", [("flip_npy", "bin_expr.npy.zst: cannot decode"),
                                          ("drop", "spot_feat.npy.zst: missing"),
                                          ("unsafe_name", "unexpected tar member"),
                                          ("symlink", "a symbolic link"), ("hardlink", "a hard link")])
def test_shard_validate_checks_members_when_the_manifest_agrees(shards, kind, member, capsys):
    corrupt(shards / "16um" / VAL, kind)
    rehash(shards / "16um", VAL)
    assert main(["shard", "validate", str(shards / "16um")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{VAL}: " in err and member in err


@pytest.mark.parametrize("kind", ["truncate", "flip_jpg", "drop"])
def test_loader_checks_each_shard_against_the_manifest(shards, kind, capsys):
    whole = _keys(_eval(shards, "fail"))
    n_bad = next(s["n_samples"] for s in json.loads((shards / "16um/manifest.json").read_text())["shards"]
                 if s["name"] == VAL)
    corrupt(shards / "16um" / VAL, kind)
    with pytest.raises(UserError, match=rf"16um/{VAL}: (bytes|sha256):.*data.on_corrupt=fail") as e:
        _eval(shards, "fail")
    assert "\n" not in str(e.value)
    batches = _eval(shards, "skip")
    assert len(_keys(batches)) == len(whole) - n_bad and _keys(batches) < whole
    assert sum(b.corrupt_samples for b in batches) == n_bad
    assert f"magnet: warning: {shards / '16um' / VAL}" in capsys.readouterr().err


@pytest.mark.parametrize("kind, member", [("flip_npy", "bin_expr.npy.zst: cannot decode"),
                                          ("drop", "spot_feat.npy.zst: missing"),
                                          ("unsafe_name", "unexpected tar member")])
def test_loader_checks_each_member_when_the_manifest_agrees(shards, kind, member, capsys):
    """Damage the manifest cannot see (a shard written that way): found when the sample is read."""
    whole = _keys(_eval(shards, "fail"))
    name = corrupt(shards / "16um" / VAL, kind)
    rehash(shards / "16um", VAL)
    with pytest.raises(UserError, match=f"16um/{VAL}: .*{member}") as e:
        _eval(shards, "fail")
    assert "\n" not in str(e.value)
    key = name.split("/")[-1].split(".")[0]
    batches = _eval(shards, "skip")
    got = _keys(batches)
    assert got < whole and sum(b.corrupt_samples for b in batches) == 1
    if kind != "unsafe_name":  # an unreadable member name ends the shard: the samples after it are not trusted
        assert len(got) == len(whole) - 1
        assert (key.split("__")[0], tuple(int(v) for v in key.split("__")[1].split("_"))) not in got
    assert member in capsys.readouterr().err


def test_training_stream_skips_a_corrupt_shard_and_keeps_equal_steps(shards):
    cfg = _cfg(shards, "skip")
    ref = TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, ONE, 0, KNN)
    corrupt(shards / "16um" / "train-000003.tar", "flip_jpg")
    stream = TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, ONE, 0, KNN)
    batches = list(stream.epoch(0))
    assert len(batches) == ref.batches_per_epoch
    assert sum(b.corrupt_samples for b in batches) >= 7  # that shard's 7 samples, each time it comes round
    cfg.on_corrupt, cfg.workers = "fail", 1  # raised in a DataLoader worker: still one line
    with pytest.raises(UserError, match="train-000003.tar: sha256") as e:
        list(TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, ONE, 0, KNN).epoch(0))
    assert "\n" not in str(e.value) and str(e.value).startswith(str(shards))


def test_all_shards_corrupt_is_an_error_not_a_hang(shards):
    for p in (shards / "16um").glob("train-*.tar"):
        corrupt(p, "truncate")
    cfg = _cfg(shards, "skip")
    with pytest.raises(UserError, match="every shard this loader reads is corrupt"):
        list(TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, ONE, 0, KNN).epoch(0))


def test_unknown_policy_is_refused(tmp_path):
    from magnet.config import load_config
    from magnet.train_config import ExperimentConfig

    with pytest.raises(UserError, match="data.on_corrupt"):
        load_config(ExperimentConfig, None, ["data.on_corrupt=ignore"])


def test_training_statistics_read_through_the_same_checks(shards, capsys):
    """model.init_from_data's pass over the training shards honours data.on_corrupt like the stream: a
    flipped byte is the shard's sha256 (not a zstd error), skipped under `skip`."""
    from magnet.models.init import training_statistics

    whole = training_statistics(ShardSet(str(shards), 16, None, None), "train")
    corrupt(shards / "16um" / "train-000000.tar", "flip_npy")
    with pytest.raises(UserError, match=r"16um/train-000000.tar: sha256: .*data.on_corrupt=fail") as e:
        training_statistics(ShardSet(str(shards), 16, None, None), "train", "fail")
    assert "\n" not in str(e.value) and "zstd" not in str(e.value).lower()
    stats = training_statistics(ShardSet(str(shards), 16, None, None), "train", "skip")
    assert "train-000000.tar: sha256: does not match manifest.json; skipped" in capsys.readouterr().err
    assert stats.keys() == whole.keys() and not np.allclose(stats["gene_mean"], whole["gene_mean"])


def test_a_shard_of_another_bin_size_is_refused_by_validate_and_by_training(shards, tiny_shards, capsys):
    """An 8 um shard listed in the 16 um manifest has arrays of the same sizes: the schema check passes it, so the
    one reader also checks each sample's meta.json (bin size, slide) for validate and training alike."""
    from magnet.format.manifest import write_manifest
    from magnet.models.init import training_statistics

    eight = json.loads((tiny_shards / "8um/manifest.json").read_text())["shards"][0]
    shutil.copy(tiny_shards / "8um" / eight["name"], shards / "16um/train-000099.tar")
    manifest = json.loads((shards / "16um/manifest.json").read_text())
    manifest["shards"].append({**eight, "name": "train-000099.tar", "split": "train"})
    write_manifest(shards / "16um/manifest.json", manifest)
    assert main(["shard", "validate", str(shards / "16um")]) == 2
    err = capsys.readouterr().err.strip()
    assert "train-000099.tar: " in err and "meta.json: bin_um is 8, manifest says 16" in err and "\n" not in err
    with pytest.raises(UserError, match=r"train-000099.tar: .*meta.json: bin_um is 8, manifest says 16"):
        training_statistics(ShardSet(str(shards), 16, None, None), "train", "fail")

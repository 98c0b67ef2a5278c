"""The format layer: one schema drives encode, decode and validation; shards written through
webdataset are byte-identical for the same samples; shards of another format version, and a manifest
edited after it was written, are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from fake_samples import TINY_GEOMETRY, VirtualSlide
from magnet.cli import main
from magnet.errors import UserError
from magnet.format.codec import decode_sample, encode_image
from magnet.format.sample import Sample
from magnet.format.schema import FORMAT_VERSION, MEMBERS
from magnet.format.tar import PartWriter, TarSamples, sha256_file
from magnet.format.check import Dims, check_sample

G, F, K = 16, 32, 8
DIMS = Dims(G=G, K1=K + 1, S=TINY_GEOMETRY.n_spots, F=F, P=TINY_GEOMETRY.image_px)


def _samples(n: int = 5):
    return VirtualSlide(20, geometry=TINY_GEOMETRY, n_genes=G, feat_dim=F, k=K).samples(n)


def _write(folder, samples, max_samples=3) -> list[dict]:
    folder.mkdir()
    writer = PartWriter(folder, max_samples, 1 << 30, DIMS, "png")
    for s in samples:
        writer.write(s, encode_image(s["image"], "png", 90))
    return writer.close()


def test_the_same_samples_give_byte_identical_shards_that_read_back(tmp_path):
    samples = _samples()
    first, second = _write(tmp_path / "a", samples), _write(tmp_path / "b", samples)
    assert [p["n_samples"] for p in first] == [3, 2]
    assert first == second
    for part in first:
        a, b = (tmp_path / "a" / part["part"]).read_bytes(), (tmp_path / "b" / part["part"]).read_bytes()
        assert a == b and sha256_file(tmp_path / "a" / part["part"]) == part["sha256"] and len(a) == part["bytes"]
    urls = [{"url": str(tmp_path / "a" / p["part"])} for p in first]
    back = [decode_sample(raw) for raw in TarSamples()(iter(urls))]
    assert [s.key for s in back] == [s.key for s in samples]
    for got, want in zip(back, samples):
        check_sample(got, DIMS, got.key, stored=True)
        assert got.meta == want.meta
        for name in want.arrays:
            assert np.array_equal(got[name], want[name]), name  # png: lossless, so the image too


def test_the_writer_refuses_a_sample_off_the_schema(tmp_path):
    sample = _samples(1)[0]
    bad = sample.replace(bin_expr=sample["bin_expr"].astype(np.float32))
    with pytest.raises(UserError, match=r"bin_expr.npy.zst: float32 .*expected float16"):
        _write(tmp_path / "a", [bad])


@pytest.mark.parametrize("member", [m for m in MEMBERS if not m.optional])
def test_every_required_member_is_checked(member):
    sample = _samples(1)[0]
    arrays = dict(sample.arrays)
    del arrays[member.name]
    with pytest.raises(UserError, match=rf"{member.filename()}: missing"):
        check_sample(Sample(meta=sample.meta, arrays=arrays), DIMS, "s")


def test_an_unknown_member_name_is_refused(tmp_path):
    import webdataset as wds

    path = tmp_path / "x.tar"
    with wds.TarWriter(str(path), encoder=False) as tar:
        tar.write({"__key__": "slide__00001_00002", "extra.bin": b"1"})
    with pytest.raises(UserError, match=r"x.tar: 'slide__00001_00002.extra.bin': unexpected tar member"):
        list(TarSamples()(iter([{"url": str(path)}])))


def test_shards_of_the_previous_format_version_are_refused_in_one_line(tiny_shards, tmp_path, capsys):
    from magnet.data.pipeline import ShardSet

    shutil.copytree(tiny_shards / "16um", tmp_path / "16um")
    path = tmp_path / "16um" / "manifest.json"
    man = json.loads(path.read_text())
    man["format_version"] = FORMAT_VERSION - 1
    path.write_text(json.dumps(man))
    assert main(["shard", "validate", str(tmp_path / "16um")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"magnet: error: {path}: format_version: shards of format {FORMAT_VERSION - 1}, this version "
                   f"reads format {FORMAT_VERSION}; re-run `magnet shard`")
    with pytest.raises(UserError, match=f"format_version: shards of format {FORMAT_VERSION - 1}"):
        ShardSet(str(tmp_path), 16, None, None)


@pytest.mark.parametrize("edit", ["two genes swapped", "checksum removed"])
def test_a_manifest_edited_after_sharding_is_refused_in_one_line(tiny_shards, tmp_path, capsys, edit):
    """The manifest's checksum covers its content: `shard validate` and training's reader refuse the edit."""
    from magnet.data.pipeline import ShardSet

    shutil.copytree(tiny_shards / "16um", tmp_path / "16um")
    path = tmp_path / "16um" / "manifest.json"
    man = json.loads(path.read_text())
    if edit == "checksum removed":
        del man["checksum"]
    else:
        man["genes"][0], man["genes"][1] = man["genes"][1], man["genes"][0]
    path.write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    assert main(["shard", "validate", str(tmp_path / "16um")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"magnet: error: {path}: checksum: the manifest was edited after `magnet shard` wrote it")
    assert "\n" not in err and "re-run `magnet shard`" in err
    with pytest.raises(UserError, match="manifest.json: checksum: the manifest was edited"):
        ShardSet(str(tmp_path), 16, None, None)

"""``magnet shard`` end to end on the tiny synthetic cohort: content against the inputs, validate,
re-run, resume after a failure with byte-identical output, 2 um bins."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile

from magnet.cli import main
from magnet.format.codec import decode_npy
from magnet.format.manifest import write_manifest
from magnet.format.schema import FORMAT_VERSION

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs/shard/tiny.yaml")


@pytest.fixture(scope="module")
def ray_one_cpu():
    """One local Ray for the module's runs (the CLI reuses it); one CPU, so slides run in order."""
    import ray

    ray.init(num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def shard(sheet, out, *extra, bins=("8", "16")):
    return main(["shard", "--samplesheet", str(sheet), "--bin-um", *bins, "--out", str(out), "--config", TINY, *extra])


def samples(folder: Path):
    for tar_path in sorted(folder.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            grouped = {}
            for info in tar:
                key, ext = info.name.split(".", 1)
                grouped.setdefault(key, {})[ext] = tar.extractfile(info).read()
        yield from grouped.items()


def slide_inputs(cohort: Path, slide: str, bin_um: int):
    """Independent read of one slide's inputs: rc -> (barcode x, y), matrix barcodes, dense counts, gene ids."""
    folder = cohort / slide / "outs" / "binned_outputs" / f"square_{bin_um:03d}um"
    pos = pq.read_table(folder / "spatial" / "tissue_positions.parquet").to_pandas().set_index(["array_row", "array_col"])
    mpp = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())["microns_per_pixel"]
    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        n_feat, n_bc = m["shape"][:]
        dense = np.zeros((n_bc, n_feat))
        indptr = m["indptr"][:]
        for j in range(n_bc):
            dense[j, m["indices"][indptr[j]:indptr[j + 1]]] = m["data"][indptr[j]:indptr[j + 1]]
        barcodes = m["barcodes"][:].astype(str)
        ids = m["features"]["id"][:].astype(str)
    return pos, mpp, {b: i for i, b in enumerate(barcodes)}, dense, list(ids)


def log1p_libsize(counts: np.ndarray, genes: list[int]) -> np.ndarray:
    """log1p(counts / library size * 1e4) of ``genes``; library size over all genes; 0 where it is 0."""
    lib = counts.sum(1, keepdims=True)
    return np.log1p(np.divide(counts[:, genes] * 1e4, lib, out=np.zeros((len(lib), len(genes))), where=lib > 0))


def test_samples_match_inputs(tiny_shards, tiny_cohort):
    folder = tiny_shards / "8um"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and len(manifest["genes"]) == 32
    assert set(manifest["splits"].values()) <= {"train", "val", "test"} and "train" in manifest["splits"].values()
    geom = manifest["geometry"]
    g, margin, mpp = geom["global_px"], geom["margin"], geom["mpp"]
    inputs = {s: slide_inputs(tiny_cohort, s, 8) for s in manifest["slides"]}
    gene_idx = [inputs[next(iter(inputs))][4].index(i) for i in manifest["gene_ids"]]
    for slide, (pos, mpp_full, row_of, dense, _) in inputs.items():
        tissue = [b for b in row_of if pos.loc[pos["barcode"] == b, "in_tissue"].iloc[0] == 1]
        assert manifest["slides"][slide]["bins_in_tissue"] == len(tissue)
    features, spot_feats, nbr_feats, seen = {}, {}, [], 0
    for key, m in samples(folder):
        meta = json.loads(m["meta.json"])
        pos, mpp_full, row_of, dense, _ = inputs[meta["slide"]]
        assert meta["split"] == manifest["splits"][meta["slide"]] and key.startswith(meta["slide"] + "__")
        xy, rc = decode_npy(m["bin_xy.npy.zst"]), decode_npy(m["bin_rc.npy.zst"])
        ox, oy = meta["gx"] * g - margin, meta["gy"] * g - margin
        # placement: by full-res pixel position (the synthetic grid is rotated against the image)
        rows = pos.loc[[tuple(r) for r in rc]]
        np.testing.assert_allclose(xy[:, 0] + ox, rows["pxl_col_in_fullres"].to_numpy() * mpp_full / mpp, atol=1e-3)
        np.testing.assert_allclose(xy[:, 1] + oy, rows["pxl_row_in_fullres"].to_numpy() * mpp_full / mpp, atol=1e-3)
        assert ((xy >= margin) & (xy < margin + g)).all()
        # expression: library size over all genes, log1p(x / lib * 1e4), selected genes
        counts = dense[[row_of[b] for b in rows["barcode"]]]
        np.testing.assert_allclose(decode_npy(m["bin_expr.npy.zst"]).astype(float), log1p_libsize(counts, gene_idx),
                                   rtol=2e-3, atol=2e-3)
        # spot cells of the centre tile: summed counts of the bins in each cell
        spot = decode_npy(m["bin_spot.npy.zst"])
        spot_expr = decode_npy(m["spot_expr.npy.zst"])[0]
        for j in np.unique(spot):
            summed = counts[spot == j].sum(0, keepdims=True)
            np.testing.assert_allclose(spot_expr[j].astype(float), log1p_libsize(summed, gene_idx)[0],
                                       rtol=2e-3, atol=2e-3)
        # image: the stored tile with margin is the slide image there (JPEG q90)
        from PIL import Image
        import io

        img = np.asarray(Image.open(io.BytesIO(m["image.jpg"])))
        assert img.shape == (geom["image_px"],) * 2 + (3,)
        full = tifffile.imread(tiny_cohort / meta["slide"] / f"{meta['slide']}_fullres.tif", level=0)
        y0, x0 = max(oy, 0), max(ox, 0)
        ref = full[y0:oy + geom["image_px"], x0:ox + geom["image_px"]]
        crop = img[y0 - oy:y0 - oy + ref.shape[0], x0 - ox:x0 - ox + ref.shape[1]]
        assert np.abs(crop.astype(int) - ref.astype(int)).mean() < 4
        mask, offs = decode_npy(m["nbr_mask.npy.zst"]), decode_npy(m["nbr_offset.npy.zst"])
        assert mask[0] and (offs[0] == 0).all() and mask.sum() == min(4, manifest["slides"][meta["slide"]]["tiles"])
        assert np.allclose(offs[mask] % (g * mpp), 0)
        features[(meta["slide"], meta["gx"], meta["gy"])] = decode_npy(m["global_feat.npy.zst"])[0]
        tissue = decode_npy(m["spot_mask.npy.zst"])[0]
        spot_feats.setdefault(meta["slide"], []).append(decode_npy(m["spot_feat.npy.zst"])[0][tissue])
        nbr_feats.append((meta["slide"], meta["gx"], meta["gy"], offs, mask, decode_npy(m["global_feat.npy.zst"])))
        seen += 1
    assert seen == sum(s["tiles"] for s in manifest["slides"].values())
    # frozen features are centred on their slide (sharding/features.py: centre_on_slide): every tile is
    # one sample's centre, so these are all of a slide's tiles and tissue spot cells
    for slide in manifest["slides"]:
        for f in (np.stack([v for k, v in features.items() if k[0] == slide]), np.concatenate(spot_feats[slide])):
            f = f.astype(np.float64)
            assert f.std(0).max() > 0 and (np.abs(f.mean(0)) <= 0.01 * f.std(0) + 1e-4).all()
    # a neighbour's features are that tile's own features
    for slide, gx, gy, offs, mask, feats in nbr_feats[:20]:
        for k in np.flatnonzero(mask):
            dx, dy = (offs[k] / (g * mpp)).round().astype(int)
            np.testing.assert_array_equal(feats[k], features[(slide, gx + dx, gy + dy)])


def test_manifest_records_its_checksum_and_each_slides_fingerprint(tiny_shards, tiny_cohort):
    from magnet.format.manifest import content_sha256
    from sharding.fingerprint import slide_fingerprints

    prints = {}
    for b in (8, 16):
        manifest = json.loads((tiny_shards / f"{b}um" / "manifest.json").read_text())
        assert manifest["checksum"] == content_sha256(manifest)
        for slide, rec in manifest["slides"].items():
            prints[(slide, b)] = rec["fingerprint"]
            assert rec["fingerprint"] == slide_fingerprints(tiny_cohort / slide / f"{slide}_fullres.tif",
                                                            tiny_cohort / slide / "outs", [b])[b]
    assert len({p["image"] for p in prints.values()}) == 3  # one per slide, the same at every bin size
    assert len({p["matrix"] for p in prints.values()}) == 6  # one per slide and bin size


def test_a_large_file_is_fingerprinted_from_sampled_blocks(tmp_path):
    from sharding.fingerprint import BLOCK, BLOCKS, file_fingerprint

    data = np.random.default_rng(0).integers(0, 256, BLOCK * BLOCKS + 12345, dtype=np.uint8).tobytes()
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    a.write_bytes(data)
    b.write_bytes(data)
    assert file_fingerprint(a) == file_fingerprint(b)  # a copy under another name
    changed = bytearray(data)
    changed[BLOCK // 2] ^= 0xFF  # inside the first sampled block
    b.write_bytes(bytes(changed))
    assert file_fingerprint(a) != file_fingerprint(b)
    b.write_bytes(data + b"\0")
    assert file_fingerprint(a) != file_fingerprint(b)


def test_one_worker_in_process_writes_the_shards_of_ray_workers(tiny_shards, tiny_cohort, tmp_path, capsys):
    """``ray.num_cpus=1`` and no Ray session: one SlideWorker in this process (Ray is not started) shards the
    cohort with one encoder; its output is that of the Ray actors (``tiny_shards``, 2 CPUs), byte for byte."""
    import ray

    assert not ray.is_initialized()
    out = tmp_path / "in_process"
    assert shard(tiny_cohort / "samplesheet.csv", out, "ray.num_cpus=1") == 0
    assert not ray.is_initialized()
    seconds = json.loads(capsys.readouterr().err.split("shard: seconds: ")[1].splitlines()[0])
    assert seconds["workers_start"] < 1 and seconds["slide_phases"]["features"] > 0
    for b in ("8um", "16um"):
        names = sorted(p.name for p in (tiny_shards / b).iterdir())
        assert names == sorted(p.name for p in (out / b).iterdir())
        for name in names:
            assert (tiny_shards / b / name).read_bytes() == (out / b / name).read_bytes(), f"{b}/{name} differs"


def test_validate_and_corruption(tiny_shards, tmp_path, capsys):
    copy = tmp_path / "16um"
    shutil.copytree(tiny_shards / "16um", copy)
    assert main(["shard", "validate", str(copy)]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((copy / "manifest.json").read_text())
    assert summary["bins"] == sum(s["bins"] for s in manifest["slides"].values()) > 0
    assert summary["slides"] == 3 and summary["genes"] == 32
    swapped = json.loads(json.dumps(manifest))  # two shards of two slides, each entry naming the other's slide
    first = swapped["shards"][0]
    other = next(s for s in swapped["shards"] if s["slide"] != first["slide"])
    first["slide"], other["slide"] = other["slide"], first["slide"]
    write_manifest(copy / "manifest.json", swapped)  # as if written so: the checksum agrees
    assert main(["shard", "validate", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert first["name"] in err and "meta.json: slide" in err and "\n" not in err
    write_manifest(copy / "manifest.json", manifest)
    victim = copy / manifest["shards"][1]["name"]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert main(["shard", "validate", str(copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert victim.name in err and "sha256" in err and "\n" not in err


def test_rerun_is_up_to_date(tiny_shards, tiny_cohort, ray_one_cpu, capsys):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tiny_shards.rglob("*") if p.is_file()
              and p.name != "shard_config.yaml"}
    assert shard(tiny_cohort / "samplesheet.csv", tiny_shards) == 0
    assert capsys.readouterr().err.count("up to date") == 2
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in tiny_shards.rglob("*") if p.is_file()
             and p.name != "shard_config.yaml"}
    assert after == before


def test_corrupt_image_is_refused_up_front_then_rerun_is_byte_identical(tiny_shards, tiny_cohort, ray_one_cpu,
                                                                          tmp_path, capsys):
    """The input check reads every image (against Space Ranger's hires image), so a corrupt tile stops the run
    before any slide is sharded; resuming after a failure midway is test_sigkill_midway_then_rerun_is_byte_identical."""
    cohort = tmp_path / "cohort"
    shutil.copytree(tiny_cohort, cohort)
    image = cohort / "synth_002" / "synth_002_fullres.tif"
    original = image.read_bytes()
    with tifffile.TiffFile(image) as tif:
        page = tif.pages[0]
        offset, size = page.dataoffsets[5], page.databytecounts[5]
    broken = bytearray(original)
    broken[offset:offset + size] = b"\0" * size
    image.write_bytes(bytes(broken))
    out = tmp_path / "out"
    assert shard(cohort / "samplesheet.csv", out) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(image) in err and "image" in err
    assert not list(out.glob("*um/*.tar")) and not list(out.glob("*um/manifest.json"))  # no final name
    assert not list(out.glob("8um/.work/*/done.json"))  # refused before any work
    image.write_bytes(original)
    assert shard(cohort / "samplesheet.csv", out) == 0
    assert "0 of 3 slides already done, 3 to do" in capsys.readouterr().err
    for b in ("8um", "16um"):
        names = sorted(p.name for p in (tiny_shards / b).iterdir())
        assert names == sorted(p.name for p in (out / b).iterdir())
        for name in names:
            assert (tiny_shards / b / name).read_bytes() == (out / b / name).read_bytes(), f"{b}/{name} differs"


@pytest.mark.slow
def test_sigkill_midway_then_rerun_is_byte_identical(tiny_shards, tiny_cohort, ray_one_cpu, tmp_path, capsys):
    """The whole sharding process group (driver and Ray) killed once the first slide's parts exist."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "magnet", "shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"),
           "--bin-um", "8", "16", "--out", str(out), "--config", TINY, "ray.num_cpus=1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob("*um/.work/*/done.json")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "sharding finished (or failed) before it could be killed"
    assert not list(out.glob("*um/manifest.json"))
    assert shard(tiny_cohort / "samplesheet.csv", out) == 0
    assert "already done" in capsys.readouterr().err
    for b in ("8um", "16um"):
        names = sorted(p.name for p in (tiny_shards / b).iterdir())
        assert names == sorted(p.name for p in (out / b).iterdir())
        for name in names:
            assert (tiny_shards / b / name).read_bytes() == (out / b / name).read_bytes(), f"{b}/{name} differs"


def test_2um_bins_with_capped_samples(tiny_cohort, ray_one_cpu, tmp_path, capsys):
    out = tmp_path / "out2"
    assert shard(tiny_cohort / "samplesheet.csv", out, "shard.bin_px=16", "shard.max_bins_per_sample=100",
                 bins=("2",)) == 0
    capsys.readouterr()
    manifest = json.loads((out / "2um" / "manifest.json").read_text())
    per_tile = [(json.loads(m["meta.json"]), decode_npy(m["bin_rc.npy.zst"])) for _, m in samples(out / "2um")]
    assert all(meta["n_bins"] == min(100, meta["n_bins_tile"]) == len(rc) for meta, rc in per_tile)
    assert any(meta["n_bins_tile"] > 100 for meta, _ in per_tile)
    assert all(len(np.unique(rc, axis=0)) == len(rc) for _, rc in per_tile)
    assert sum(s["bins_in_tiles"] for s in manifest["slides"].values()) > sum(s["bins"] for s in manifest["slides"].values())
    assert main(["shard", "validate", str(out / "2um")]) == 0


def test_workers_take_a_share_of_a_gpu_when_the_cluster_has_gpus():
    """No GPU here: the scheduling is checked on resource tables as ``ray.cluster_resources()`` gives them."""
    from magnet.errors import UserError
    from sharding.config import RayConfig, ShardConfig
    from sharding.run import worker_slots

    def cfg(**ray):
        return ShardConfig(ray=RayConfig(**ray))

    assert worker_slots(cfg(), {"CPU": 16.0, "GPU": 2.0}) == (2, {"num_cpus": 1, "num_gpus": 1.0})
    assert worker_slots(cfg(gpus_per_task=0.25), {"CPU": 16.0, "GPU": 2.0})[0] == 8
    assert worker_slots(cfg(device="cpu"), {"CPU": 16.0, "GPU": 2.0}) == (16, {"num_cpus": 1})
    assert worker_slots(cfg(cpus_per_task=4), {"CPU": 16.0}) == (4, {"num_cpus": 4})
    with pytest.raises(UserError, match="ray.device: cuda, but the Ray cluster has 0 GPUs"):
        worker_slots(cfg(device="cuda"), {"CPU": 16.0})


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal needs a machine without CUDA")
def test_encoder_on_cuda_without_a_gpu_is_refused_before_any_slide(tiny_cohort, tmp_path, capsys):
    out = tmp_path / "cuda"
    assert shard(tiny_cohort / "samplesheet.csv", out, "ray.num_cpus=1", "ray.device=cuda") == 2
    err = capsys.readouterr().err
    # in this process, or through the module's Ray session when a test before started one
    assert "magnet: error: config: ray.device: cuda, but " in err and "use ray.device=auto or cpu" in err
    assert "Traceback" not in err
    assert not list(out.rglob("*.tar")) and not list(out.rglob("manifest.json"))

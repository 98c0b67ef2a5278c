"""Parts of the sharding stage: lazy pyramidal image reads, splits, gene selection on training slides."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from magnet.errors import UserError
from sharding.config import SplitConfig
from sharding.image import SlideImage
from sharding.samplesheet import read_samplesheet
from sharding.splits import assign_splits


def smooth_rgb(side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC))


def halve(img: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(img).reduce(2))


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory):
    """A tiled pyramidal BigTIFF at 0.25 um/px with levels 1, 1/2, 1/4."""
    levels = [smooth_rgb(1024)]
    levels += [halve(levels[-1])]
    levels += [halve(levels[-1])]
    path = tmp_path_factory.mktemp("img") / "slide.tif"
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(levels[0], tile=(128, 128), subifds=2, photometric="rgb")
        for lv in levels[1:]:
            tif.write(lv, tile=(128, 128), subfiletype=1, photometric="rgb")
    return path, levels


def test_region_from_the_matching_pyramid_level(pyramid):
    path, levels = pyramid
    with SlideImage(path) as im:
        assert im.size == (1024, 1024)
        np.testing.assert_array_equal(im.region(100, 60, 128, mpp=0.5, mpp_full=0.25), levels[1][60:188, 100:228])
        np.testing.assert_array_equal(im.region(30, 40, 64, mpp=1.0, mpp_full=0.25), levels[2][40:104, 30:94])
        # partly outside: white there
        edge = im.region(-10, 240, 32, mpp=1.0, mpp_full=0.25)
        assert (edge[:, :10] == 255).all() and (edge[16:, :] == 255).all()
        np.testing.assert_array_equal(edge[:16, 10:], levels[2][240:256, 0:22])


def test_region_resampled_between_levels(pyramid):
    path, levels = pyramid
    with SlideImage(path) as im:
        got = im.region(50, 50, 100, mpp=0.4, mpp_full=0.25).astype(int)  # from level 0 (0.25), x1.6
    ref = np.asarray(Image.fromarray(levels[0][80:240, 80:240]).resize((100, 100), Image.Resampling.LANCZOS))
    assert got.shape == (100, 100, 3) and np.abs(got - ref.astype(int)).mean() < 3


def test_rgba_png_is_read_as_rgb(tmp_path):
    rgb = smooth_rgb(256, seed=3)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])).save(tmp_path / "rgba.png")
    with SlideImage(tmp_path / "rgba.png") as a, SlideImage(tmp_path / "rgb.png") as b:
        np.testing.assert_array_equal(a.region(5, 7, 64, 0.5, 0.5), b.region(5, 7, 64, 0.5, 0.5))
        np.testing.assert_array_equal(a.region(5, 7, 64, 0.5, 0.5), rgb[7:71, 5:69])


@pytest.fixture(scope="module")
def slide_files(tmp_path_factory) -> dict[str, Path]:
    """One 900 x 1000 px image as a tiled pyramidal JPEG TIFF and a tiled planar TIFF."""
    rgb = np.ascontiguousarray(smooth_rgb(1024, seed=5)[:1000, :900])
    folder = tmp_path_factory.mktemp("tiffs")
    paths = {"jpeg": folder / "slide.tif", "planar": folder / "planar.tif"}
    with tifffile.TiffWriter(paths["jpeg"], bigtiff=True) as tif:
        tif.write(rgb, tile=(256, 256), subifds=1, photometric="rgb", compression="jpeg")
        tif.write(halve(rgb), tile=(256, 256), subfiletype=1, photometric="rgb", compression="jpeg")
    tifffile.imwrite(paths["planar"], np.moveaxis(rgb, -1, 0), tile=(256, 256), photometric="rgb",
                     planarconfig="separate")
    return paths


def test_tiled_tiff_levels_are_read_tile_by_tile_as_the_zarr_store_reads_them(slide_files, monkeypatch):
    """Decoded tiles are cached (a small cache here, so tiles are evicted and decoded again): every box, inside,
    across and past the edges, equals tifffile's zarr store; other layouts keep the zarr store."""
    import zarr

    from sharding import image as image_mod

    monkeypatch.setattr(image_mod, "TILE_CACHE_MB", 1)  # 5 tiles of 256 px
    rng = np.random.default_rng(3)
    with SlideImage(slide_files["jpeg"]) as im:
        assert all(isinstance(level, image_mod._Tiles) for _, level in im._levels) and len(im._levels) == 2
        for i, (_, level) in enumerate(im._levels):
            ref = zarr.open(im._tif.series[0].aszarr(level=i), mode="r")
            h, w = ref.shape[:2]
            for _ in range(25):
                x0, y0 = (int(v) for v in rng.integers(-50, (w, h)))
                x1, y1 = x0 + int(rng.integers(1, 700)), y0 + int(rng.integers(1, 700))
                got = im._read(level, x0, y0, x1, y1)
                want = np.full_like(got, 255)
                cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
                if cx0 < cx1 and cy0 < cy1:
                    want[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = ref[cy0:cy1, cx0:cx1, :3]
                assert np.array_equal(got, want), (i, x0, y0, x1, y1)
                assert len(level.cache) <= level.max_tiles == 5
    with SlideImage(slide_files["planar"]) as im:
        assert not any(isinstance(level, image_mod._Tiles) for _, level in im._levels)


def write_sheet(tmp_path: Path, rows: list[str], header="slide,spaceranger,image,patient,split") -> Path:
    """The sheet of ``rows`` (``slide,outs,img.tif,...``), each slide given its own files ``{slide}/outs`` and
    ``{slide}/img.tif`` (one file under two slide names is refused)."""
    rows = [r.replace(",outs,img.tif,", f",{r.split(',')[0]}/outs,{r.split(',')[0]}/img.tif,") for r in rows]
    for r in rows:
        slide = tmp_path / r.split(",")[0]
        (slide / "outs").mkdir(parents=True, exist_ok=True)
        (slide / "img.tif").write_bytes(b"")
    sheet = tmp_path / "slides.csv"
    sheet.write_text(header + "\n" + "\n".join(rows) + "\n")
    return sheet


def test_patient_level_seeded_splits(tmp_path):
    rows = [f"s{i},outs,img.tif,p{i // 2}," for i in range(12)]
    entries = read_samplesheet(write_sheet(tmp_path, rows))
    splits, folds = assign_splits(entries, SplitConfig(), seed=5, source="slides.csv")
    for i in range(0, 12, 2):
        assert splits[f"s{i}"] == splits[f"s{i + 1}"] and folds[f"s{i}"] == folds[f"s{i + 1}"]
    assert sorted(splits.values()).count("test") == 2 and sorted(splits.values()).count("val") == 2
    assert assign_splits(entries, SplitConfig(), seed=5, source="slides.csv") == (splits, folds)


def test_explicit_splits_are_honoured_and_checked(tmp_path):
    rows = ["a,outs,img.tif,,test", "b,outs,img.tif,,", "c,outs,img.tif,,"]
    splits, _ = assign_splits(read_samplesheet(write_sheet(tmp_path, rows)), SplitConfig(), 0, "slides.csv")
    assert splits["a"] == "test" and "train" in (splits["b"], splits["c"])
    bad = ["a,outs,img.tif,p1,test", "b,outs,img.tif,p1,train"]
    with pytest.raises(UserError, match="split: patient 'p1'"):
        assign_splits(read_samplesheet(write_sheet(tmp_path, bad)), SplitConfig(), 0, "slides.csv")


def test_genes_are_top_mean_of_training_slides(tiny_shards, tiny_cohort):
    import scanpy as sc

    manifest = json.loads((tiny_shards / "16um" / "manifest.json").read_text())
    train = manifest["gene_selection"]["training_slides"]
    assert train == sorted(s for s, split in manifest["splits"].items() if split == "train") and len(train) < 3
    adatas = [sc.read_10x_h5(tiny_cohort / s / "outs/binned_outputs/square_016um/filtered_feature_bc_matrix.h5",
                             gex_only=True) for s in train]
    mean = np.zeros(adatas[0].n_vars)
    for ad in adatas:
        sc.pp.normalize_total(ad, target_sum=1e4)
        sc.pp.log1p(ad)
        mean += np.asarray(ad.X.sum(0)).ravel()
    top = np.argsort(-mean, kind="stable")[: len(manifest["genes"])]
    assert set(manifest["gene_ids"]) == set(adatas[0].var["gene_ids"].iloc[top])
    assert manifest["normalisation"] == {"method": "log1p_libsize", "target_sum": 10000.0,
                                         "library_size": "all genes of the bin / spot / tile"}


def test_hvg_prefers_dispersed_genes_and_top_mean_prefers_high_means():
    from sharding.config import GeneConfig
    from sharding.genes import GeneStats, select_genes

    rng = np.random.default_rng(0)
    n_bins, n_genes = 400, 600
    counts = rng.poisson(rng.uniform(1, 10, n_genes), (n_bins, n_genes)).astype(float)
    counts[:, :3] = rng.poisson(40.0, (n_bins, 3))  # high mean, Poisson: not over-dispersed
    counts[:, 10:13] = rng.poisson(25.0, (n_bins, 3)) * (rng.random((n_bins, 3)) < 0.2)  # bursty: over-dispersed
    cfg = GeneConfig(n_genes=3, selection="hvg")
    stats = GeneStats(n_genes, cfg)
    rows, cols = np.nonzero(counts)
    stats(counts[rows, cols], cols, counts.sum(1)[rows])
    stats.n_bins = n_bins
    ids = [f"g{i}" for i in range(n_genes)]
    assert list(select_genes(ids, ids, stats, cfg)) == [10, 11, 12]
    top = GeneConfig(n_genes=3, selection="top_mean")
    assert list(select_genes(ids, ids, stats, top)) == [0, 1, 2]


def _rewrite_in_other_order(src: Path, dst: Path, seed: int) -> None:
    """``dst``: the bin folder ``src`` with the positions shuffled into row groups of 50 rows and the
    matrix columns (barcodes) shuffled: the same bins in another order."""
    import h5py
    import pyarrow.parquet as pq

    from magnet.synth.spaceranger import write_matrix_h5
    from sharding.binned_outputs import read_genes

    rng = np.random.default_rng(seed)
    (dst / "spatial").mkdir(parents=True)
    (dst / "spatial/scalefactors_json.json").write_bytes((src / "spatial/scalefactors_json.json").read_bytes())
    table = pq.read_table(src / "spatial/tissue_positions.parquet")
    pq.write_table(table.take(rng.permutation(len(table))), dst / "spatial/tissue_positions.parquet", row_group_size=50)
    with h5py.File(src / "filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        barcodes, indptr, gene, count = (m[k][:] for k in ("barcodes", "indptr", "indices", "data"))
    perm = rng.permutation(len(barcodes))
    column = np.argsort(perm)[np.repeat(np.arange(len(barcodes)), np.diff(indptr))]
    order = np.lexsort((gene, column))
    ids, names = read_genes(src / "filtered_feature_bc_matrix.h5")
    write_matrix_h5(dst / "filtered_feature_bc_matrix.h5", barcodes[perm], ids, names, column[order], gene[order],
                    count[order])


def test_bins_do_not_depend_on_row_order_or_batches(tiny_cohort, tmp_path, monkeypatch):
    """Positions read in many small batches, in any row order, and matrix barcodes in any order give the
    same bins (matched by barcode); a repeated position barcode is refused in unsorted files too."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import sharding.binned_outputs as reader

    slide = tiny_cohort / "synth_000"
    with SlideImage(slide / "synth_000_fullres.tif") as im:
        size = im.size
    genes = np.arange(0, 60, 3)
    ref = reader.read_bins(reader.BinFiles.of(slide / "outs", 8), size, genes)
    outs = tmp_path / "outs"
    _rewrite_in_other_order(slide / "outs/binned_outputs/square_008um", outs / "binned_outputs/square_008um", seed=1)
    monkeypatch.setattr(reader, "POSITION_BATCH", 64)
    files = reader.BinFiles.of(outs, 8)
    got = reader.read_bins(files, size, genes)
    assert not np.array_equal(got.barcodes, ref.barcodes)  # another order, the same bins
    a, b = np.argsort(ref.barcodes), np.argsort(got.barcodes)
    np.testing.assert_array_equal(got.barcodes[b], ref.barcodes[a])
    for name in ("rc", "xy", "libsize"):
        np.testing.assert_array_equal(getattr(got, name)[b], getattr(ref, name)[a])
    np.testing.assert_array_equal(got.counts[b].toarray(), ref.counts[a].toarray())
    assert reader.read_bins(files, size, genes, with_barcodes=False).barcodes is None

    table = pq.read_table(files.positions)
    pq.write_table(pa.concat_tables([table, table.slice(len(table) // 2, 1)]), files.positions, row_group_size=50)
    with pytest.raises(UserError, match="tissue_positions.parquet: barcode: duplicate barcodes"):
        reader.read_bins(files, size, genes)


def test_pairing_compares_the_smallest_space_ranger_image_large_enough(tmp_path):
    """The lowres image when it has COMPARE_PX on its longest side, else the hires one; none: nothing to check."""
    from sharding.pairing import COMPARE_PX, _reference

    def spatial(lowres_px: int) -> Path:
        d = tmp_path / str(lowres_px)
        d.mkdir()
        Image.fromarray(smooth_rgb(1024)).save(d / "tissue_hires_image.png")
        Image.fromarray(smooth_rgb(1024)).resize((lowres_px, lowres_px)).save(d / "tissue_lowres_image.png")
        (d / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.5,
                                                              "tissue_lowres_scalef": 0.5 * lowres_px / 1024}))
        return d

    big, small = spatial(COMPARE_PX), spatial(COMPARE_PX - 1)
    assert _reference(big) == (big / "tissue_lowres_image.png", 0.5 * COMPARE_PX / 1024)
    assert _reference(small) == (small / "tissue_hires_image.png", 0.5)
    (big / "scalefactors_json.json").unlink()
    assert _reference(big) is None

"""``magnet synth``: Space Ranger HD layout read by independent readers, exact binning, images,
determinism, ground truth, and bad input."""

import csv
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import tifffile
from PIL import Image
from scipy import sparse

from magnet.cli import main
from magnet.config import config_from_saved
from magnet.synth import SynthConfig
from magnet.synth.expression import make_programs

BINS = (2, 8, 16)


def _slides(cohort: Path) -> list[dict]:
    with open(cohort / "samplesheet.csv", newline="") as f:
        return list(csv.DictReader(f))


def _level(cohort: Path, slide: str, bin_um: int) -> Path:
    return cohort / slide / "outs" / "binned_outputs" / f"square_{bin_um:03d}um"


def _positions(cohort: Path, slide: str, bin_um: int) -> pd.DataFrame:
    return pd.read_parquet(_level(cohort, slide, bin_um) / "spatial" / "tissue_positions.parquet")


def _raw(cohort, slide, bin_um):
    return sc.read_10x_h5(_level(cohort, slide, bin_um) / "raw_feature_bc_matrix.h5")


def test_samplesheet_and_resolved_config(tiny_cohort):
    cfg = config_from_saved(SynthConfig, tiny_cohort / "config.yaml")
    rows = _slides(tiny_cohort)
    assert list(rows[0]) == ["slide", "spaceranger", "image"]
    assert [r["slide"] for r in rows] == [f"synth_{i:03d}" for i in range(cfg.slides)]
    for r in rows:
        assert not Path(r["spaceranger"]).is_absolute() and not Path(r["image"]).is_absolute()
        assert (tiny_cohort / r["spaceranger"] / "binned_outputs").is_dir()
        assert (tiny_cohort / r["image"]).is_file()


def test_h5_read_by_scanpy_matches_positions(tiny_cohort):
    cfg = config_from_saved(SynthConfig, tiny_cohort / "config.yaml")
    names = make_programs(cfg.expression, np.random.default_rng([cfg.seed, 0])).gene_names
    slide = _slides(tiny_cohort)[0]["slide"]
    for bin_um in BINS:
        pos = _positions(tiny_cohort, slide, bin_um)
        raw = _raw(tiny_cohort, slide, bin_um)
        filt = sc.read_10x_h5(_level(tiny_cohort, slide, bin_um) / "filtered_feature_bc_matrix.h5")
        assert raw.shape == (len(pos), cfg.expression.n_genes)
        assert filt.shape == (int(pos.in_tissue.sum()), cfg.expression.n_genes)
        assert list(raw.var_names) == names and list(filt.var_names) == names
        assert (raw.var["feature_types"] == "Gene Expression").all()
        assert list(raw.obs_names) == list(pos.barcode)
        assert list(filt.obs_names) == list(pos.barcode[pos.in_tissue == 1])
        assert raw.X[~(pos.in_tissue == 1).to_numpy()].sum() + filt.X.sum() == raw.X.sum()
        assert filt.X.sum() > 2 * (bin_um / 2) ** 2 * filt.n_obs  # bins under tissue hold transcripts


def test_positions_columns_dtypes_and_barcodes(tiny_cohort):
    slide = _slides(tiny_cohort)[0]["slide"]
    for bin_um in BINS:
        pos = _positions(tiny_cohort, slide, bin_um)
        assert list(pos.columns) == ["barcode", "in_tissue", "array_row", "array_col",
                                     "pxl_row_in_fullres", "pxl_col_in_fullres"]
        for col in ("in_tissue", "array_row", "array_col"):
            assert pd.api.types.is_integer_dtype(pos[col])
        assert pos.pxl_row_in_fullres.dtype == np.float64 and pos.pxl_col_in_fullres.dtype == np.float64
        assert set(pos.in_tissue.unique()) == {0, 1}
        m = pos.barcode.str.extract(rf"^s_{bin_um:03d}um_(\d{{5}})_(\d{{5}})-1$").astype(int)
        assert (m[0] == pos.array_row).all() and (m[1] == pos.array_col).all()
        n = pos.array_row.max() + 1
        assert len(pos) == n * n and pos.barcode.is_monotonic_increasing


def test_scalefactors_consistent(tiny_cohort):
    cfg = config_from_saved(SynthConfig, tiny_cohort / "config.yaml")
    slide = _slides(tiny_cohort)[0]["slide"]
    side = round(cfg.size_um / cfg.mpp)
    for bin_um in BINS:
        spatial = _level(tiny_cohort, slide, bin_um) / "spatial"
        sf = json.loads((spatial / "scalefactors_json.json").read_text())
        assert sf["bin_size_um"] == bin_um
        assert sf["bin_size_um"] / sf["spot_diameter_fullres"] == pytest.approx(sf["microns_per_pixel"])
        assert sf["microns_per_pixel"] == cfg.mpp
        for key in ("tissue_hires_scalef", "tissue_lowres_scalef", "regist_target_img_scalef",
                    "fiducial_diameter_fullres"):
            assert sf[key] > 0
        hires = Image.open(spatial / "tissue_hires_image.png")
        low = Image.open(spatial / "tissue_lowres_image.png")
        assert max(hires.size) <= 6000 and max(hires.size) == round(side * sf["tissue_hires_scalef"])
        assert max(low.size) == round(side * sf["tissue_lowres_scalef"]) <= 600


def _binned(adata, pos, factor):
    """Sum the rows of a raw 2 um matrix into blocks of factor x factor bins (row-major block ids)."""
    n = (pos.array_row.max() + 1) // factor
    block = (pos.array_row.to_numpy() // factor) * n + pos.array_col.to_numpy() // factor
    agg = sparse.csr_matrix((np.ones(len(block)), (block, np.arange(len(block)))), shape=(n * n, len(block)))
    return (agg @ sparse.csr_matrix(adata.X)).toarray()


def test_8_and_16um_are_sums_of_2um_bins(tiny_cohort):
    for row in _slides(tiny_cohort)[:2]:
        slide = row["slide"]
        raw2, pos2 = _raw(tiny_cohort, slide, 2), _positions(tiny_cohort, slide, 2)
        for bin_um in (8, 16):
            big = _raw(tiny_cohort, slide, bin_um).X.toarray()
            summed = _binned(raw2, pos2, bin_um // 2)
            assert big.sum() > 0
            np.testing.assert_array_equal(big, summed)


def test_bin_centres_follow_one_rigid_transform(tiny_cohort):
    slide = _slides(tiny_cohort)[1]["slide"]
    pos2, pos16 = _positions(tiny_cohort, slide, 2), _positions(tiny_cohort, slide, 16)
    # a 16 um bin's centre is the mean of its 64 2 um bins' centres
    block = (pos2.array_row // 8) * (pos16.array_row.max() + 1) + pos2.array_col // 8
    means = pos2.groupby(block)[["pxl_row_in_fullres", "pxl_col_in_fullres"]].mean()
    np.testing.assert_allclose(means.to_numpy(), pos16[["pxl_row_in_fullres", "pxl_col_in_fullres"]].to_numpy(),
                               atol=1e-6)
    # neighbouring bins are one bin side apart, and the grid is rotated by at most ~1 degree
    sf = json.loads((_level(tiny_cohort, slide, 16) / "spatial" / "scalefactors_json.json").read_text())
    grid = pos16.set_index(["array_row", "array_col"])
    xy = ["pxl_row_in_fullres", "pxl_col_in_fullres"]
    step = grid.loc[(0, 1), xy] - grid.loc[(0, 0), xy]
    assert np.hypot(*step) == pytest.approx(sf["spot_diameter_fullres"])
    assert abs(np.degrees(np.arctan2(step.iloc[0], step.iloc[1]))) <= 1.0 + 1e-9


def test_tiff_pyramid_resolution_and_tissue_under_bins(tiny_cohort):
    cfg = config_from_saved(SynthConfig, tiny_cohort / "config.yaml")
    row = _slides(tiny_cohort)[0]
    with tifffile.TiffFile(tiny_cohort / row["image"]) as tif:
        assert tif.is_bigtiff
        levels = tif.series[0].levels
        assert len(levels) >= 2
        side = round(cfg.size_um / cfg.mpp)
        assert levels[0].shape == (side, side, 3) and levels[1].shape == (side // 2, side // 2, 3)
        page = tif.pages[0]
        assert page.is_tiled
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 / (num / den) == pytest.approx(cfg.mpp)
        image = levels[0].asarray()
    gray = image.astype(np.float32).mean(axis=2)
    pos = _positions(tiny_cohort, row["slide"], 8)
    r = np.floor(pos.pxl_row_in_fullres.to_numpy()).astype(int)
    c = np.floor(pos.pxl_col_in_fullres.to_numpy()).astype(int)
    assert r.min() >= 0 and c.min() >= 0 and r.max() < side and c.max() < side
    # mean over the 16 x 16 px of each bin: tissue bins are stained, the others are glass
    patches = np.stack([gray[r + dy, c + dx] for dy in range(-8, 8) for dx in range(-8, 8)]).mean(axis=0)
    inside = pos.in_tissue.to_numpy() == 1
    assert inside.any() and (~inside).any()
    assert np.median(patches[inside]) < np.median(patches[~inside]) - 40
    assert np.quantile(patches[~inside], 0.1) > 200  # glass is bright


def test_ground_truth_is_the_mean_of_the_counts(tiny_cohort):
    slide = _slides(tiny_cohort)[0]["slide"]
    for bin_um in (8, 16):
        filt = sc.read_10x_h5(_level(tiny_cohort, slide, bin_um) / "filtered_feature_bc_matrix.h5")
        with h5py.File(tiny_cohort / slide / "ground_truth" / f"expected_{bin_um:03d}um.h5") as f:
            assert [b.decode() for b in f["barcodes"][:]] == list(filt.obs_names)
            assert [g.decode() for g in f["genes"][:]] == list(filt.var_names)
            expected = f["expected"][:]
        assert expected.dtype == np.float32 and expected.shape == filt.shape
        observed = filt.X.toarray()
        assert observed.sum() == pytest.approx(expected.sum(), rel=0.02)
        per_gene = np.corrcoef(observed.sum(axis=0), expected.sum(axis=0))[0, 1]
        assert per_gene > 0.99
        # per bin and gene the counts scatter as Poisson around the means
        z = (observed - expected) / np.sqrt(expected + 1e-3)
        assert abs(z.mean()) < 0.05 and 0.8 < z.var() < 1.2


def test_marker_programs_separate_cell_types(tiny_cohort):
    slide = _slides(tiny_cohort)[0]["slide"]
    with h5py.File(tiny_cohort / slide / "ground_truth" / "expected_016um.h5") as f:
        genes = np.array([g.decode() for g in f["genes"][:]])
        expected = f["expected"][:]

    def program(prefix):
        return expected[:, np.char.startswith(genes, prefix)].sum(axis=1)

    tum, lym = program("TUM"), program("LYM")
    assert np.corrcoef(tum, lym)[0, 1] < 0
    # two halves of one marker set agree across bins
    tum_genes = np.flatnonzero(np.char.startswith(genes, "TUM"))
    a, b = expected[:, tum_genes[::2]].sum(axis=1), expected[:, tum_genes[1::2]].sum(axis=1)
    assert np.corrcoef(a, b)[0, 1] > 0.9


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical(tmp_path):
    args = ["synth", "--slides", "1", "--size-um", "160", "--mpp", "0.5"]
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "3", "--out", str(tmp_path / "b")]) == 0
    assert main([*args, "--seed", "4", "--out", str(tmp_path / "c")]) == 0
    a, b, c = _digest(tmp_path / "a"), _digest(tmp_path / "b"), _digest(tmp_path / "c")
    assert len(a) == 39 and a == b  # 2 + tif + 7 ground truth + 3 bin sizes x 6 + feature slice + outs/spatial 3
    # + segmented_outputs: 2 GeoJSON, cell matrix, barcode mappings, spatial 3
    assert a["synth_000/synth_000_fullres.tif"] != c["synth_000/synth_000_fullres.tif"]


def test_overwrite_replaces_and_overrides_apply(tmp_path, capsys):
    out = tmp_path / "cohort"
    assert main(["synth", "--slides", "1", "--size-um", "128", "--out", str(out)]) == 0
    (out / "old.txt").write_text("x")
    assert main(["synth", "--slides", "1", "--size-um", "128", "--out", str(out), "--overwrite",
                 "expression.n_genes=310", "tissue.tumour_fraction=0.5"]) == 0
    assert not (out / "old.txt").exists()
    cfg = config_from_saved(SynthConfig, out / "config.yaml")
    assert cfg.expression.n_genes == 310 and cfg.tissue.tumour_fraction == 0.5
    assert sc.read_10x_h5(_level(out, "synth_000", 16) / "raw_feature_bc_matrix.h5").n_vars == 310
    assert "samplesheet" in capsys.readouterr().out


@pytest.mark.parametrize("extra, field", [
    (["--size-um", "0"], "size_um"),
    (["--mpp", "-0.5"], "mpp"),
    (["--slides", "0"], "slides"),
    (["expression.n_genes=10"], "n_genes"),
    (["expression.nope=1"], "expression.nope"),
])
def test_impossible_arguments_fail_cleanly(tmp_path, capsys, extra, field):
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("magnet: error:") and field in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_unwritable_or_nonempty_out_dir_fails_cleanly(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    assert main(["synth", "--size-um", "128", "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--out" in err
    assert blocker.read_text() == "not a folder"

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    assert main(["synth", "--size-um", "128", "--out", str(full)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert main(["synth", "--size-um", "128", "--out", str(full), "--overwrite"]) == 2  # not a synth folder
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "refusing to delete" in err
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "full"]

"""SpatialData in and out: synthetic slides open with the scverse reader (``spatialdata_io.visium_hd``) and
agree with the project's own reader; ``magnet predict --format spatialdata`` writes a store that
``spatialdata.read_zarr`` reads back, lining up with the .h5ad of the same prediction."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

SLIDE = "synth_000"
GENE = 3  # index of the gene compared between readers


def _outs(cohort: Path) -> Path:
    return cohort / SLIDE / "outs"


def _image(cohort: Path) -> Path:
    return cohort / SLIDE / f"{SLIDE}_fullres.tif"


@pytest.fixture(scope="module")
def scverse(tiny_cohort):
    from spatialdata_io import visium_hd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return visium_hd(_outs(tiny_cohort), dataset_id=SLIDE, load_segmentations_only=False,
                         fullres_image_file=_image(tiny_cohort))


@pytest.mark.parametrize("bin_um", [8, 16])
def test_visium_hd_reader_agrees_with_the_project_reader(scverse, tiny_cohort, bin_um):
    from sharding.image import SlideImage
    from sharding.reader import BinFiles, read_bins, read_genes

    files = BinFiles.of(_outs(tiny_cohort), bin_um)
    with SlideImage(_image(tiny_cohort)) as image:
        ours = read_bins(files, image.size, np.array([GENE]))
    _, names = read_genes(files.matrix)
    table = scverse.tables[f"square_{bin_um:03d}um"]
    assert table.n_obs == len(ours.barcodes) > 100
    assert set(table.obs_names) == set(ours.barcodes)
    theirs = table[list(ours.barcodes)]
    assert theirs.var_names[GENE] == names[GENE]
    counts = np.asarray(theirs.X[:, GENE].todense()).ravel()
    np.testing.assert_array_equal(counts, ours.counts.toarray().ravel())
    assert counts.sum() > 0
    # the bins' square shapes are centred on the positions our reader places bins by, in full-res px
    shapes = scverse.shapes[f"{SLIDE}_square_{bin_um:03d}um"]
    row = theirs.obs["location_id"].to_numpy()
    centres = np.stack([shapes.geometry.centroid.x.loc[row], shapes.geometry.centroid.y.loc[row]], axis=1)
    np.testing.assert_allclose(centres, ours.xy, atol=1e-6)
    side = np.sqrt(shapes.geometry.area.to_numpy())
    mpp = json.loads(files.scalefactors.read_text())["microns_per_pixel"]
    np.testing.assert_allclose(side, bin_um / mpp)


def test_visium_hd_reader_finds_the_image_and_spatial_folder(scverse, tiny_cohort):
    from spatialdata.transformations import get_transformation

    full = scverse.images[f"{SLIDE}_full_image"]["scale0"]["image"]
    assert full.shape[1:] == (768, 768)
    hires = scverse.images[f"{SLIDE}_hires_image"]
    scale = json.loads((_outs(tiny_cohort) / "spatial" / "scalefactors_json.json").read_text())["tissue_hires_scalef"]
    assert hires.shape[1] == round(768 * scale)
    assert get_transformation(hires, to_coordinate_system=SLIDE).scale[0] == pytest.approx(1 / scale)


def test_feature_slice_sums_to_the_binned_matrices(tiny_cohort):
    """Each gene's 2 um slice, summed over 8 um blocks, is the 8 um matrix; the masks are the filtered bins;
    the spot-to-microscope transform puts every 2 um bin on its tissue_positions pixel."""
    import scanpy as sc

    outs = _outs(tiny_cohort)
    level = outs / "binned_outputs" / "square_008um"
    adata = sc.read_10x_h5(level / "raw_feature_bc_matrix.h5")
    pos = pd.read_parquet(level / "spatial" / "tissue_positions.parquet").set_index("barcode").loc[adata.obs_names]
    with h5py.File(outs / "feature_slice.h5") as f:
        meta = json.loads(f.attrs["metadata_json"])
        assert json.loads(meta["hd_layout_json"])["file_format"] == "1.0"
        n2 = meta["nrows"]
        g = f[f"feature_slices/{GENE}"]
        grid8 = np.zeros((n2 // 4, n2 // 4), np.int64)
        np.add.at(grid8, (g["row"][:] // 4, g["col"][:] // 4), g["data"][:])
        mask = f["masks/square_008um"]
        masked = set(zip(mask["row"][:].tolist(), mask["col"][:].tolist()))
        to_px = np.array(meta["transform_matrices"]["spot_colrow_to_microscope_colrow"])
        back = np.array(meta["transform_matrices"]["microscope_colrow_to_spot_colrow"])
        np.testing.assert_allclose(back @ to_px, np.eye(3), atol=1e-12)
        assert f["features/name"][GENE].decode() == adata.var_names[GENE]
    expected = np.asarray(adata.X[:, GENE].todense()).ravel()
    np.testing.assert_array_equal(grid8[pos["array_row"], pos["array_col"]], expected)
    assert expected.sum() > 0
    tissue = pos[pos["in_tissue"] == 1]
    assert masked == set(zip(tissue["array_row"], tissue["array_col"]))
    p2 = pd.read_parquet(outs / "binned_outputs" / "square_002um" / "spatial" / "tissue_positions.parquet")
    xy = to_px @ np.stack([p2["array_col"], p2["array_row"], np.ones(len(p2))])
    np.testing.assert_allclose(xy[:2].T, p2[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), atol=1e-6)

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
    from sharding.binned_outputs import BinFiles, read_bins, read_genes

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


@pytest.fixture(scope="module")
def both_formats(registered, tiny_cohort, tmp_path_factory):
    """The same prediction written as .h5ad and as a SpatialData store (the CLI, in this process); each has its own
    stem, as each output's {stem}.config.yaml is written beside it."""
    from magnet.cli import main

    uri, _ = registered
    out = tmp_path_factory.mktemp("sdata")
    base = ["predict", "--model", "models:/tiny@champion", "--tracking-uri", uri,
            "--spaceranger", str(_outs(tiny_cohort)), "--image", str(_image(tiny_cohort)), "--bin-um", "16",
            "batch_size=1", "max_bins=100000", "progress=false"]
    assert main([*base, "--out", str(out / "pred.h5ad")]) == 0
    with pytest.MonkeyPatch.context() as mp:  # the bin squares are streamed in batches: several of them here
        mp.setattr("magnet.predict.spatialdata_out.SHAPE_BATCH", 100)
        assert main([*base, "--format", "spatialdata", "--out", str(out / "pred_sd.zarr")]) == 0
    return out


def test_spatialdata_store_lines_up_with_the_h5ad(both_formats):
    import anndata as ad
    import dask.array as da
    import spatialdata
    from spatialdata.models import TableModel

    adata = ad.read_h5ad(both_formats / "pred.h5ad")
    sdata = spatialdata.read_zarr(both_formats / "pred_sd.zarr")
    slide = SLIDE + "_fullres"  # the slide's name: the image file's, as in the .h5ad's uns['spatial']
    assert list(adata.uns["spatial"]) == [slide] and list(sdata.coordinate_systems) == [slide]
    table = sdata.tables["magnet_square_016um"]
    TableModel.validate(table)
    assert table.uns["spatialdata_attrs"]["region"] == f"{slide}_magnet_square_016um"
    assert list(table.obs_names) == list(adata.obs_names) and list(table.var_names) == list(adata.var_names)
    np.testing.assert_allclose(table.X, adata.X, rtol=1e-6, atol=1e-6)
    assert (table.layers["measured"] != adata.layers["measured"]).nnz == 0 and adata.layers["measured"].nnz > 0
    for col in adata.obs.columns:
        np.testing.assert_array_equal(table.obs[col], adata.obs[col])
    np.testing.assert_array_equal(table.obsm["spatial"], adata.obsm["spatial"])
    for level, table_name, shapes_name in (("spot", "magnet_spots", f"{slide}_magnet_spots"),
                                           ("global", "magnet_tiles", f"{slide}_magnet_tiles")):
        ref = adata.uns["magnet"][level]
        np.testing.assert_allclose(sdata.tables[table_name].X, ref["X"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sdata.tables[table_name].obsm["spatial"], ref["spatial"])
        assert len(sdata.shapes[shapes_name]) == len(ref["X"])
    np.testing.assert_array_equal(sdata.tables["magnet_spots"].obs["in_tissue"] == 1,
                                  adata.uns["magnet"]["spot"]["tissue"])
    image = sdata.images[f"{slide}_full_image"]
    assert list(image) == ["scale0", "scale1"] and isinstance(image["scale0"]["image"].data, da.Array)
    assert image["scale0"]["image"].shape == (3, 768, 768) and image["scale1"]["image"].shape == (3, 384, 384)


def test_bin_shapes_sit_on_their_pixels(both_formats, tiny_cohort):
    """Through the coordinate transformations, bin i's square is centred on the .h5ad's obsm['spatial'][i], is
    one bin wide, and the image pixel there is the slide image's pixel; squares tile without overlap."""
    import anndata as ad
    import shapely
    import spatialdata
    import tifffile
    from spatialdata.transformations import get_transformation

    adata = ad.read_h5ad(both_formats / "pred.h5ad")
    sdata = spatialdata.read_zarr(both_formats / "pred_sd.zarr")
    slide = SLIDE + "_fullres"
    table = sdata.tables["magnet_square_016um"]
    bins = spatialdata.transform(sdata.shapes[f"{slide}_magnet_square_016um"], to_coordinate_system=slide)
    polys = bins.geometry.loc[table.obs["instance_id"].to_numpy()]
    centres = np.stack([polys.centroid.x, polys.centroid.y], axis=1)
    np.testing.assert_allclose(centres, adata.obsm["spatial"], atol=1e-6)
    side = 16 / adata.uns["spatial"][slide]["scalefactors"]["microns_per_pixel"]
    np.testing.assert_allclose(polys.area, side**2, rtol=1e-3)
    assert shapely.union_all(polys.to_numpy()).area == pytest.approx(polys.area.sum(), rel=1e-6)  # no overlap
    import pyarrow.parquet as pq

    shapes = both_formats / "pred_sd.zarr" / "shapes"
    parquet = pq.ParquetFile(next(shapes.glob("*_magnet_square_016um/shapes.parquet")))
    assert parquet.num_row_groups == -(-len(polys) // 100)  # written in batches of 100 bins
    bbox = json.loads(parquet.schema_arrow.metadata[b"geo"])["columns"]["geometry"]["bbox"]
    np.testing.assert_allclose(bbox, bins.total_bounds, atol=1e-6)
    key = {(r, c): k for k, (r, c) in enumerate(zip(table.obs["array_row"], table.obs["array_col"]))}
    pairs = [(k, key[r, c + 1]) for (r, c), k in key.items() if (r, c + 1) in key]
    assert len(pairs) > 100
    corners = shapely.get_coordinates(polys.to_numpy()).reshape(len(polys), 5, 2)  # from the top-left, clockwise
    i, j = np.array(pairs).T  # neighbours along a row share an edge: i's right one is j's left one
    np.testing.assert_allclose(corners[i][:, [1, 2]], corners[j][:, [0, 3]], atol=1e-6)
    image = sdata.images[f"{slide}_full_image"]["scale0"]["image"]
    assert get_transformation(image, to_coordinate_system=slide).to_affine_matrix(("x", "y"), ("x", "y")).tolist() == \
        np.eye(3).tolist()
    x, y = np.floor(centres).astype(int).T
    tif = tifffile.imread(_image(tiny_cohort))
    np.testing.assert_array_equal(image.values[:, y, x], tif[y, x, :3].T)


def test_overlay_png_draws_measured_next_to_predicted(both_formats, tmp_path):
    """The docs' spatialdata-plot example (scripts/spatialdata_overlay.py): two panels over the H&E that differ."""
    import importlib.util

    from PIL import Image

    script = Path(__file__).parents[1] / "scripts" / "spatialdata_overlay.py"
    spec = importlib.util.spec_from_file_location("overlay", script)
    overlay = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overlay)
    png = tmp_path / "overlay.png"
    overlay.overlay(str(both_formats / "pred_sd.zarr"), "TUM08", str(png))
    rgb = np.asarray(Image.open(png).convert("RGB"), np.float32)
    h, w, _ = rgb.shape
    assert w > 1.6 * h and h > 300
    left, right = rgb[:, : w // 2], rgb[:, w - w // 2:]  # equal halves, whatever the width's parity
    assert np.abs(left - right).mean() > 5  # measured and predicted colourings differ
    assert left.std() > 20 and right.std() > 20


def _refused(argv, capsys, expect):
    from magnet.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: ") and expect in err[0], err


def test_bad_spatialdata_output_is_refused_and_nothing_is_left(registered, tiny_cohort, tmp_path, capsys):
    import tifffile

    _, run_dir = registered
    base = ["predict", "--model", str(run_dir / "model"), "--spaceranger", str(_outs(tiny_cohort)), "--format",
            "spatialdata"]
    folder = tmp_path / "mine.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    _refused([*base, "--image", str(_image(tiny_cohort)), "--out", str(folder)], capsys, "exists; pass --overwrite")
    _refused([*base, "--image", str(_image(tiny_cohort)), "--out", str(folder), "--overwrite"], capsys,
             "not a SpatialData store")
    assert (folder / "notes.txt").read_text() == "keep me"
    small = tmp_path / "small.tif"  # refused while predicting: after the store was begun under a temporary name
    tifffile.imwrite(small, tifffile.imread(_image(tiny_cohort))[:600, :600])
    out = tmp_path / "p.zarr"
    _refused([*base, "--image", str(small), "--out", str(out)], capsys, "image size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.zarr", "small.tif"]


def test_image_only_png_prediction_as_spatialdata(registered, tiny_cohort, tmp_path):
    """A PNG and --mpp alone: bins laid over detected tissue, no measured layer, the image copied exactly."""
    import spatialdata
    import tifffile
    from PIL import Image

    from magnet.cli import main

    _, run_dir = registered
    rgb = tifffile.imread(_image(tiny_cohort))[..., :3]
    png = tmp_path / "he.png"
    Image.fromarray(rgb).save(png)
    out = tmp_path / "he.zarr"
    assert main(["predict", "--model", str(run_dir / "model"), "--image", str(png), "--mpp", "0.5", "--bin-um", "16",
                 "--format", "spatialdata", "--out", str(out), "batch_size=1", "max_bins=100000",
                 "progress=false"]) == 0
    sdata = spatialdata.read_zarr(out)
    table = sdata.tables["magnet_square_016um"]
    assert table.n_obs > 100 and "measured" not in table.layers and table.uns["magnet"]["grid"] == "tissue_detection"
    bins = sdata.shapes["he_magnet_square_016um"].geometry.loc[table.obs["instance_id"].to_numpy()]
    np.testing.assert_allclose(np.stack([bins.centroid.x, bins.centroid.y], 1), table.obsm["spatial"], atol=1e-6)
    np.testing.assert_allclose(bins.area, 32.0**2, rtol=1e-6)
    np.testing.assert_array_equal(sdata.images["he_full_image"]["scale0"]["image"].values, rgb.transpose(2, 0, 1))

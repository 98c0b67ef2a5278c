"""`magnet synth` writes Space Ranger 4's cell segmentation (outs/segmented_outputs/) from its own cells: the
scverse reader (spatialdata_io.visium_hd) opens it, and its per-cell counts are the slide's 2 um counts summed
over the barcode mappings; the ground truth's per-cell expected counts follow the same cells."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp


def _two_um_counts(outs) -> pd.DataFrame:
    """The filtered 2 um matrix as a barcodes x genes sparse frame, read with h5py (not through the reader)."""
    with h5py.File(outs / "binned_outputs/square_002um/filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        shape = tuple(m["shape"][:])
        mat = sp.csc_matrix((m["data"][:], m["indices"][:], m["indptr"][:]), shape=shape).T.tocsr()
        return mat, [b.decode() for b in m["barcodes"][:]]


def test_spatialdata_io_reads_the_synthetic_segmentation(tiny_cohort):
    from spatialdata_io import visium_hd

    outs = tiny_cohort / "synth_000" / "outs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = visium_hd(outs, load_segmentations_only=True, load_nucleus_segmentations=True)
    table = sdata.tables["cell_segmentations"]
    shapes = next(v for k, v in sdata.shapes.items() if k.endswith("cell_segmentations"))
    assert table.n_obs == len(shapes) > 100 and list(shapes.index) == list(table.obs_names)
    assert "nucleus_segmentations" in sdata.tables

    # the cell table is the 2 um counts summed over each cell's bins (barcode_mappings.parquet, Space Ranger 4's)
    maps = pd.read_parquet(outs / "segmented_outputs/barcode_mappings.parquet")
    assert list(maps.columns) == ["square_002um", "square_008um", "square_016um", "cell_id", "in_nucleus", "in_cell"]
    assert (maps["cell_id"].notna() == maps["in_cell"]).all() and not (maps["in_nucleus"] & ~maps["in_cell"]).any()
    mat, barcodes = _two_um_counts(outs)
    row = pd.Series(np.arange(len(barcodes)), index=barcodes)
    cells = maps[maps["in_cell"]]
    assert cells["square_002um"].isin(row.index).all()  # cells hold only bins under tissue
    cell_index = pd.Series(np.arange(table.n_obs), index=table.obs_names)
    member = sp.csr_matrix((np.ones(len(cells)), (cell_index[cells["cell_id"]].to_numpy(),
                                                  row[cells["square_002um"]].to_numpy())),
                           shape=(table.n_obs, len(barcodes)))
    summed = (member @ mat).toarray()
    np.testing.assert_array_equal(np.asarray(table.X.todense()), summed)
    assert summed.sum() > 1000

    # each cell's polygon holds the centres of its bins (full-resolution px)
    pos = pd.read_parquet(outs / "binned_outputs/square_002um/spatial/tissue_positions.parquet").set_index("barcode")
    first = cells.groupby("cell_id")["square_002um"].first()
    pts = pos.loc[first.to_numpy(), ["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    from shapely.geometry import Point

    inside = [shapes.geometry[c].buffer(1e-6).contains(Point(*p)) for c, p in zip(first.index, pts)]
    assert all(inside)

    # ground truth: expected counts per segmented cell, same rows, close to the sampled counts in total
    with h5py.File(tiny_cohort / "synth_000/ground_truth/expected_cells.h5") as f:
        assert [b.decode() for b in f["barcodes"][:]] == list(table.obs_names)
        expected = f["expected"][:]
    assert expected.shape == summed.shape
    assert abs(expected.sum() / summed.sum() - 1) < 0.05
    assert np.corrcoef(expected.sum(1), summed.sum(1))[0, 1] > 0.8
    geo = json.loads((outs / "segmented_outputs/cell_segmentations.geojson").read_text())
    assert {f["properties"]["cell_id"] for f in geo["features"]} == set(range(1, table.n_obs + 1))

"""Space Ranger HD's slide-level outputs beside ``binned_outputs/``, which the scverse reader
(``spatialdata_io.visium_hd``) needs on top of the binned folders.

* ``outs/feature_slice.h5``: the 2 um counts stored as one sparse image per gene
  (``feature_slices/<gene index>/{row,col,data}``, genes with at least one UMI only), the total UMIs
  (``umis/total/``), the in-tissue bins of each bin size (``masks/square_XXXum/``, at that bin size),
  the matrices' ``features`` group, and the root attribute ``metadata_json``: sample and slide names,
  grid size, spot pitch, the HD layout (``hd_layout_json``, itself a JSON string, file format 1.0) and
  ``transform_matrices``, 3 x 3 projective matrices from 2 um bin (col, row) indices to full-resolution
  pixel (col, row) positions of the bin centres (pixel (0, 0) spans [0, 1) x [0, 1)) and back.
  Space Ranger's ``images``, ``reads``, ``secondary_analysis`` and ``segmentations`` groups and the
  CytAssist transforms are not written (no CytAssist image is simulated).
* ``outs/spatial/``: ``tissue_hires_image.png``, ``tissue_lowres_image.png`` and
  ``scalefactors_json.json`` (for the 2 um bins, as Space Ranger writes it).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from magnet.spaceranger_layout import Outs
from magnet.synth import spaceranger
from magnet.synth.grid import BinGrid
from magnet.synth.spaceranger import _dataset, _group

FILE_FORMAT = "1.0"
SPOT_PITCH_UM = 2.0


def spot_to_pixel(grid: BinGrid, mpp: float) -> np.ndarray:
    """3 x 3 matrix taking (col, row, 1) of a 2 um bin to (x, y, 1) of its centre in full-resolution px."""
    c, s = np.cos(grid.theta), np.sin(grid.theta)
    p = SPOT_PITCH_UM
    # grid (u, v) um of bin (col, row)'s centre = p * (col + 0.5, row + 0.5); image = R(theta) (u, v) + offset
    return np.array([
        [c * p, -s * p, (c - s) * p / 2 + grid.offset[0]],
        [s * p, c * p, (s + c) * p / 2 + grid.offset[1]],
        [0.0, 0.0, mpp],
    ]) / mpp


def _coo(parent: h5py.Group, name: str, row: np.ndarray, col: np.ndarray, data: np.ndarray) -> None:
    g = _group(parent, name)
    _dataset(g, "row", row.astype(np.int32))
    _dataset(g, "col", col.astype(np.int32))
    _dataset(g, "data", data)


def write_feature_slice(path: Path, slide: str, grid: BinGrid, mpp: float, counts, gene_ids: list[str],
                        gene_names: list[str], in_tissue: dict[int, np.ndarray]) -> None:
    """``counts``: 2 um (bin, gene, count) triples sorted by bin (bin = row * n2 + col); ``in_tissue``:
    row-major in-tissue flags per bin size."""
    bins2, genes, count = counts
    n2 = grid.n2
    to_px = spot_to_pixel(grid, mpp)
    metadata = {
        "sample_id": slide,
        "sample_desc": "synthetic slide (magnet synth)",
        "slide_name": slide,
        "nrows": n2,
        "ncols": n2,
        "spot_pitch": SPOT_PITCH_UM,
        "hd_layout_json": json.dumps({"file_format": FILE_FORMAT, "transform": np.eye(3).tolist()}),
        "transform_matrices": {
            "spot_colrow_to_microscope_colrow": to_px.tolist(),
            "microscope_colrow_to_spot_colrow": np.linalg.inv(to_px).tolist(),
        },
    }
    with h5py.File(path, "w", track_order=False) as f:
        f.attrs["metadata_json"] = json.dumps(metadata)
        spaceranger.write_features(f, gene_ids, gene_names)
        slices = _group(f, "feature_slices")
        order = np.argsort(genes, kind="stable")  # by gene, bins still sorted within a gene
        bounds = np.searchsorted(genes[order], np.arange(len(gene_ids) + 1))
        for g in np.flatnonzero(np.diff(bounds)):
            sel = order[bounds[g]:bounds[g + 1]]
            row, col = np.divmod(bins2[sel], n2)
            _coo(slices, str(g), row, col, count[sel].astype(np.uint32))
        del order
        starts = np.flatnonzero(np.r_[True, bins2[1:] != bins2[:-1]])
        row, col = np.divmod(bins2[starts], n2)
        _coo(_group(f, "umis"), "total", row, col, np.add.reduceat(count, starts).astype(np.uint32))
        masks = _group(f, "masks")
        for bin_um, flags in sorted(in_tissue.items()):
            row, col = np.divmod(np.flatnonzero(flags), grid.n_side(bin_um))
            _coo(masks, Outs.square(bin_um), row, col, np.ones(len(row), np.uint8))


def write_slide_outputs(outs: Path, slide: str, grid: BinGrid, mpp: float, counts, gene_ids: list[str],
                        gene_names: list[str], in_tissue: dict[int, np.ndarray], png_bytes: dict,
                        png_scales: dict) -> None:
    """``outs/feature_slice.h5`` and ``outs/spatial/`` (see the module docstring)."""
    layout = Outs(outs)
    layout.spatial.mkdir()
    for name, data in png_bytes.items():
        (layout.spatial / name).write_bytes(data)
    spaceranger.write_json(layout.spatial / Outs.SCALEFACTORS, spaceranger.scalefactors(2, mpp, png_scales))
    write_feature_slice(layout.feature_slice, slide, grid, mpp, counts, gene_ids, gene_names, in_tissue)

"""Writers for the Space Ranger HD output layout (``outs/binned_outputs/square_XXXum/``).

* ``{filtered,raw}_feature_bc_matrix.h5``: the 10x HDF5 matrix (CSC, one column per barcode,
  ``matrix/features/{id,name,feature_type,genome,_all_tag_keys}``); raw holds every bin, filtered
  the bins under tissue. Barcodes are ``s_008um_{array_row:05d}_{array_col:05d}-1`` in row-major
  (= sorted) order.
* ``spatial/tissue_positions.parquet``: every bin's barcode, in_tissue, array_row, array_col and its
  centre in full-resolution pixels (``pxl_row_in_fullres``, ``pxl_col_in_fullres``).
* ``spatial/scalefactors_json.json``.

HDF5 objects are created without timestamps, so equal inputs give byte-identical files.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GENOME = "SYNTH1"
FIDUCIAL_DIAMETER_UM = 330.0  # printed fiducial frame of the HD capture area (approximate)


def barcodes(bin_um: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``s_{bin:03d}um_{row:05d}_{col:05d}-1`` as a fixed-width bytes array, built without Python loops."""
    template = np.frombuffer(f"s_{bin_um:03d}um_00000_00000-1".encode(), np.uint8)
    out = np.tile(template, (len(rows), 1))
    for start, values in ((8, rows), (14, cols)):
        v = np.asarray(values, np.int64)
        for d in range(5):
            out[:, start + 4 - d] = ord("0") + (v // 10**d) % 10
    return out.view(f"S{len(template)}").ravel()


def _group(parent: h5py.Group, name: str) -> h5py.Group:
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    gcpl.set_obj_track_times(False)
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def _dataset(group: h5py.Group, name: str, data: np.ndarray, compress: bool = True) -> None:
    opts = dict(compression="gzip", compression_opts=1, shuffle=True) if compress and data.size > 1024 else {}
    group.create_dataset(name, data=data, track_times=False, **opts)


def write_matrix_h5(path: Path, barcode_list: np.ndarray, gene_ids: list[str], gene_names: list[str],
                    column: np.ndarray, gene: np.ndarray, count: np.ndarray) -> None:
    """Sparse entries sorted by (column, gene); ``column`` indexes ``barcode_list``."""
    indptr = np.zeros(len(barcode_list) + 1, np.int64)
    np.cumsum(np.bincount(column, minlength=len(barcode_list)), out=indptr[1:])
    with h5py.File(path, "w", track_order=False) as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["version"] = 2
        f.attrs["software_version"] = "magnet-synth"
        f.attrs["chemistry_description"] = "Visium HD v1 (synthetic)"
        f.attrs["library_ids"] = np.array([b"synthetic"])
        f.attrs["original_gem_groups"] = np.array([1], np.int64)
        m = _group(f, "matrix")
        _dataset(m, "barcodes", barcode_list)
        _dataset(m, "data", count.astype(np.int32))
        _dataset(m, "indices", gene.astype(np.int64))
        _dataset(m, "indptr", indptr)
        _dataset(m, "shape", np.array([len(gene_ids), len(barcode_list)], np.int32), compress=False)
        write_features(m, gene_ids, gene_names)


def write_features(parent: h5py.Group, gene_ids: list[str], gene_names: list[str]) -> None:
    """The ``features`` group of 10x HDF5 files (matrices and the feature slice file alike)."""
    feats = _group(parent, "features")
    _dataset(feats, "id", np.array(gene_ids, dtype="S"))
    _dataset(feats, "name", np.array(gene_names, dtype="S"))
    _dataset(feats, "feature_type", np.full(len(gene_ids), b"Gene Expression"))
    _dataset(feats, "genome", np.full(len(gene_ids), GENOME.encode()))
    _dataset(feats, "_all_tag_keys", np.array([b"genome"]), compress=False)


def write_positions(path: Path, barcode_list: np.ndarray, in_tissue: np.ndarray, rows: np.ndarray,
                    cols: np.ndarray, pxl_row: np.ndarray, pxl_col: np.ndarray) -> None:
    width = barcode_list.dtype.itemsize
    offsets = np.arange(len(barcode_list) + 1, dtype=np.int32) * width
    names = pa.StringArray.from_buffers(len(barcode_list), pa.py_buffer(offsets), pa.py_buffer(barcode_list.tobytes()))
    table = pa.table({
        "barcode": names,
        "in_tissue": pa.array(in_tissue.astype(np.int32)),
        "array_row": pa.array(rows.astype(np.int32)),
        "array_col": pa.array(cols.astype(np.int32)),
        "pxl_row_in_fullres": pa.array(pxl_row.astype(np.float64)),
        "pxl_col_in_fullres": pa.array(pxl_col.astype(np.float64)),
    })
    pq.write_table(table, path, compression="zstd")


def scalefactors(bin_um: int, mpp: float, png_scales: dict) -> dict:
    return {
        "spot_diameter_fullres": bin_um / mpp,
        "bin_size_um": float(bin_um),
        "microns_per_pixel": mpp,
        "regist_target_img_scalef": png_scales["tissue_hires_scalef"],
        "tissue_lowres_scalef": png_scales["tissue_lowres_scalef"],
        "fiducial_diameter_fullres": FIDUCIAL_DIAMETER_UM / mpp,
        "tissue_hires_scalef": png_scales["tissue_hires_scalef"],
    }


def write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2) + "\n")

"""Space Ranger HD binned outputs: ``outs/binned_outputs/square_{002,008,016}um/``.

Per bin size: ``filtered_feature_bc_matrix.h5`` (10x HDF5, CSC, one column per barcode),
``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``. Bins are placed by
``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` (the bin grid may be rotated against the image),
never by array indices; ``microns_per_pixel`` from the scalefactors is the pixel size trusted.
The matrix is read in blocks of barcodes and cut down to the selected genes as it is read, so
memory holds the selected genes only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from magnet.errors import UserError

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
MPP_TOLERANCE = 0.05  # relative: spot_diameter_fullres * microns_per_pixel vs bin_size_um
BLOCK = 100_000  # barcodes per block read from the h5 matrix


@dataclasses.dataclass(frozen=True)
class BinFiles:
    matrix: Path
    positions: Path
    scalefactors: Path

    @classmethod
    def of(cls, outs: Path, bin_um: int) -> "BinFiles":
        folder = outs / "binned_outputs" / f"square_{bin_um:03d}um"
        if not folder.is_dir():
            raise UserError(f"{outs}: binned_outputs/square_{bin_um:03d}um: folder missing (needed for bin size {bin_um} um)")
        files = cls(folder / "filtered_feature_bc_matrix.h5", folder / "spatial" / "tissue_positions.parquet",
                     folder / "spatial" / "scalefactors_json.json")
        for f in dataclasses.astuple(files):
            if not f.is_file():
                raise UserError(f"{f}: file missing")
        return files


@dataclasses.dataclass
class Bins:
    """In-tissue bins of one slide at one bin size, in matrix order."""

    barcodes: np.ndarray  # str (n,)
    rc: np.ndarray  # int32 (n, 2): array_row, array_col
    xy: np.ndarray  # float64 (n, 2): centre in full-res px, x = column, y = row
    libsize: np.ndarray  # float64 (n,): total counts over all genes
    counts: "scipy.sparse.csr_matrix"  # noqa: F821  float32 (n, G) selected genes


def read_mpp(path: Path, bin_um: int) -> float:
    """microns_per_pixel of the full-res image, checked against bin_size_um and spot_diameter_fullres."""
    try:
        sf = json.loads(path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{path}: not valid JSON") from None
    for key in ("microns_per_pixel", "bin_size_um", "spot_diameter_fullres"):
        if not isinstance(sf.get(key), (int, float)) or not np.isfinite(sf[key]) or sf[key] <= 0:
            raise UserError(f"{path}: {key}: missing or not a positive number")
    mpp, size, diam = float(sf["microns_per_pixel"]), float(sf["bin_size_um"]), float(sf["spot_diameter_fullres"])
    if abs(size - bin_um) > 1e-6 * bin_um:
        raise UserError(f"{path}: bin_size_um: {size} does not match the folder's bin size {bin_um} um")
    if abs(diam * mpp - size) > MPP_TOLERANCE * size:
        raise UserError(
            f"{path}: microns_per_pixel: {mpp} is inconsistent with spot_diameter_fullres {diam} px "
            f"for bin_size_um {size} ({diam * mpp:.3f} um)"
        )
    return mpp


def _open_h5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path}: not a readable HDF5 file (truncated or corrupt)") from None


def _h5_read(path: Path, ds, field: str, sl=slice(None)):
    try:
        return ds[field][sl]
    except KeyError:
        raise UserError(f"{path}: {ds.name}/{field}: dataset missing") from None
    except OSError:
        raise UserError(f"{path}: {ds.name}/{field}: cannot be read (truncated or corrupt file)") from None


def _gex_rows(path: Path, features) -> np.ndarray:
    if "feature_type" not in features:
        return np.ones(len(_h5_read(path, features, "id")), bool)
    return _h5_read(path, features, "feature_type").astype(str) == "Gene Expression"


def read_genes(path: Path) -> tuple[list[str], list[str]]:
    """Gene expression features of a matrix: (ids, names), in matrix order."""
    with _open_h5(path) as f:
        if "matrix" not in f or "features" not in f["matrix"]:
            raise UserError(f"{path}: matrix/features: group missing (not a 10x feature-barcode matrix)")
        features = f["matrix/features"]
        gex = _gex_rows(path, features)
        ids = _h5_read(path, features, "id").astype(str)[gex].tolist()
        names = _h5_read(path, features, "name").astype(str)[gex].tolist()
    return ids, names


def _positions(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    for col in POSITION_COLUMNS:
        if col not in table.column_names:
            raise UserError(f"{path}: column '{col}' missing")
    return table


def check_positions_columns(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    for col in POSITION_COLUMNS:
        if col not in names:
            raise UserError(f"{path}: column '{col}' missing")


def _place(files: BinFiles, barcodes: np.ndarray, image_size: tuple[int, int]):
    """Match matrix barcodes to positions; return (keep mask over matrix columns, rc, xy) of tissue bins."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _positions(files.positions)
    pos_bc = table["barcode"].cast(pa.string())
    if pc.count_distinct(pos_bc).as_py() != len(pos_bc):
        raise UserError(f"{files.positions}: barcode: duplicate barcodes")
    if len(np.unique(barcodes)) != len(barcodes):
        raise UserError(f"{files.matrix}: matrix/barcodes: duplicate barcodes")
    idx = pc.index_in(pa.array(barcodes.astype(str)), value_set=pos_bc)
    missing = idx.null_count
    if missing:
        first = barcodes[np.asarray(idx.is_null())][0].decode()
        raise UserError(f"{files.matrix}: matrix/barcodes: {missing} barcodes not in {files.positions.name} (e.g. {first})")
    rows = np.asarray(idx, dtype=np.int64)
    in_tissue = np.asarray(table["in_tissue"].take(rows), dtype=np.int64) == 1
    if not in_tissue.any():
        raise UserError(f"{files.positions}: in_tissue: no bin of the matrix is in tissue")
    rows = rows[in_tissue]
    rc = np.stack([np.asarray(table[c].take(rows), dtype=np.int64) for c in ("array_row", "array_col")], 1)
    xy = np.stack([np.asarray(table[c].take(rows), dtype=np.float64)
                   for c in ("pxl_col_in_fullres", "pxl_row_in_fullres")], 1)
    width, height = image_size
    for axis, col, limit in ((0, "pxl_col_in_fullres", width), (1, "pxl_row_in_fullres", height)):
        bad = ~np.isfinite(xy[:, axis]) | (xy[:, axis] < 0) | (xy[:, axis] > limit)
        if bad.any():
            raise UserError(f"{files.positions}: {col}: {int(bad.sum())} tissue bins outside the image "
                            f"({width} x {height} px), e.g. {xy[bad][0, axis]}")
    return in_tissue, rc.astype(np.int32), xy


def read_bins(files: BinFiles, image_size: tuple[int, int], genes: np.ndarray | None, stats=None) -> Bins:
    """In-tissue bins with counts of ``genes`` (indices into the gene-expression features; None = none).

    ``stats(values, gene_index, libsize_per_value)`` is called per block with every count of every
    tissue bin (all genes), to accumulate per-gene statistics for gene selection.
    """
    import scipy.sparse as sp

    with _open_h5(files.matrix) as f:
        if "matrix" not in f:
            raise UserError(f"{files.matrix}: matrix: group missing (not a 10x feature-barcode matrix)")
        m = f["matrix"]
        gex = _gex_rows(files.matrix, m["features"])
        barcodes = _h5_read(files.matrix, m, "barcodes")
        indptr = _h5_read(files.matrix, m, "indptr").astype(np.int64)
        if len(indptr) != len(barcodes) + 1 or indptr[-1] != m["data"].shape[0]:
            raise UserError(f"{files.matrix}: matrix/indptr: inconsistent with matrix/barcodes and matrix/data")
        keep, rc, xy = _place(files, barcodes, image_size)
        gex_index = np.full(len(gex), -1, np.int64)
        gex_index[gex] = np.arange(int(gex.sum()))
        sel = np.full(len(gex), -1, np.int64)
        if genes is not None:
            sel[np.flatnonzero(gex)[genes]] = np.arange(len(genes))
        out_row = np.cumsum(keep) - 1
        libsize = np.zeros(len(barcodes))
        parts = []
        for start in range(0, len(barcodes), BLOCK):
            stop = min(start + BLOCK, len(barcodes))
            a, b = indptr[start], indptr[stop]
            data = _h5_read(files.matrix, m, "data", slice(a, b)).astype(np.float64)
            feat = _h5_read(files.matrix, m, "indices", slice(a, b)).astype(np.int64)
            if not np.isfinite(data).all() or (data < 0).any():
                raise UserError(f"{files.matrix}: matrix/data: negative or NaN counts")
            if len(feat) and (feat.min() < 0 or feat.max() >= len(gex)):
                raise UserError(f"{files.matrix}: matrix/indices: feature index out of range")
            col = np.repeat(np.arange(start, stop), np.diff(indptr[start:stop + 1]))
            use = keep[col] & gex[feat]
            data, feat, col = data[use], feat[use], col[use]
            libsize[start:stop] = np.bincount(col - start, weights=data, minlength=stop - start)
            if stats is not None:
                stats(data, gex_index[feat], libsize[col])
            s = sel[feat] >= 0
            parts.append((out_row[col[s]], sel[feat[s]], data[s].astype(np.float32)))
    n = int(keep.sum())
    rows, cols, vals = (np.concatenate(p) for p in zip(*parts)) if parts else ([], [], [])
    counts = sp.csr_matrix((vals, (rows, cols)), shape=(n, 0 if genes is None else len(genes)), dtype=np.float32)
    return Bins(barcodes=barcodes[keep].astype(str), rc=rc, xy=xy, libsize=libsize[keep], counts=counts)

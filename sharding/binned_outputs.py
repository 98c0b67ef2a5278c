"""Space Ranger HD binned outputs: ``outs/binned_outputs/square_{002,008,016}um/``.

Per bin size: ``filtered_feature_bc_matrix.h5`` (10x HDF5, CSC, one column per barcode),
``spatial/tissue_positions.parquet`` and ``spatial/scalefactors_json.json``. Bins are placed by
``pxl_row_in_fullres`` / ``pxl_col_in_fullres`` (the bin grid may be rotated against the image),
never by array indices; ``microns_per_pixel`` from the scalefactors is the pixel size trusted.
The matrix is read in blocks of barcodes and cut down to the selected genes as it is read, and the
positions in batches of rows, so memory holds the selected genes and the tissue bins' positions only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from magnet.spaceranger_layout import Outs

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
MPP_TOLERANCE = 0.05  # relative: spot_diameter_fullres * microns_per_pixel vs bin_size_um
BLOCK = 100_000  # barcodes per block read from the h5 matrix
POSITION_BATCH = 500_000  # rows per batch read from tissue_positions.parquet


@dataclasses.dataclass(frozen=True)
class BinFiles:
    matrix: Path
    positions: Path
    scalefactors: Path

    @classmethod
    def of(cls, outs: Path, bin_um: int) -> "BinFiles":
        layout = Outs(outs)
        if not layout.binned(bin_um).is_dir():
            raise UserError(f"{outs}: {Outs.BINNED}/{Outs.square(bin_um)}: folder missing "
                            f"(needed for bin size {bin_um} um)")
        files = cls(layout.bin_matrix(bin_um), layout.bin_positions(bin_um), layout.bin_scalefactors(bin_um))
        for f in dataclasses.astuple(files):
            if not f.is_file():
                raise UserError(f"{f}: file missing")
        return files


@dataclasses.dataclass
class Bins:
    """In-tissue bins of one slide at one bin size, in matrix order."""

    barcodes: np.ndarray | None  # str (n,); None when read without them
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
    import h5py  # start-up time: the CLI imports this module

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


def check_positions_columns(path: Path) -> None:
    import pyarrow.parquet as pq  # start-up time: the CLI imports this module

    try:
        names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None
    for col in POSITION_COLUMNS:
        if col not in names:
            raise UserError(f"{path}: column '{col}' missing")


def _parquet(path: Path):
    import pyarrow.parquet as pq  # start-up time: the CLI imports this module

    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None


def _position_batches(path: Path):
    """The positions table in batches of POSITION_BATCH rows (the needed columns only)."""
    table = _parquet(path)
    for col in POSITION_COLUMNS:
        if col not in table.schema_arrow.names:
            raise UserError(f"{path}: column '{col}' missing")
    try:
        yield from table.iter_batches(POSITION_BATCH, columns=list(POSITION_COLUMNS))
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__})") from None


def _fixed_bytes(arr) -> np.ndarray:
    """An arrow string array as a fixed-width bytes (``S``) array: a view of its data when all values have
    one length (barcodes do), else through Python objects."""
    import pyarrow as pa  # start-up time: the CLI imports this module

    arr = arr.cast(pa.large_binary()).fill_null(b"")
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset:arr.offset + len(arr) + 1]
    lengths = np.diff(offsets)
    if len(arr) and lengths.min() == lengths.max() > 0:
        data = np.frombuffer(arr.buffers()[2], np.uint8)[offsets[0]:offsets[-1]]
        return data.view(f"S{lengths[0]}").copy()
    return np.array(arr.to_pylist(), dtype=f"S{max(int(lengths.max(initial=0)), 1)}")


def _increasing(s: np.ndarray) -> bool:
    return bool((s[1:] > s[:-1]).all())


def _duplicate_positions(path: Path) -> bool:
    """Whether the positions' barcodes repeat (read whole: only for files whose barcodes are not sorted)."""
    import pyarrow.compute as pc  # start-up time: the CLI imports this module

    col = _parquet(path).read(columns=["barcode"])["barcode"]
    return pc.count_distinct(col).as_py() != len(col)


def _place(files: BinFiles, barcodes: np.ndarray, image_size: tuple[int, int]):
    """Match matrix barcodes to positions; return (keep mask over matrix columns, rc, xy) of tissue bins.

    The positions are read in batches and matched against the sorted matrix barcodes (sorted already in
    Space Ranger output, so usually without a copy); memory holds (n, 2) rc and xy in matrix order.
    """
    order, matrix = None, barcodes
    if not _increasing(barcodes):
        order = np.argsort(barcodes, kind="stable")
        matrix = barcodes[order]
        if (matrix[1:] == matrix[:-1]).any():
            raise UserError(f"{files.matrix}: matrix/barcodes: duplicate barcodes")
    n = len(barcodes)
    found = np.zeros(n, bool)
    in_tissue = np.zeros(n, bool)
    rc = np.zeros((n, 2), np.int32)
    xy = np.zeros((n, 2), np.float64)
    pos_sorted, last = True, None
    for batch in _position_batches(files.positions):
        bc = _fixed_bytes(batch.column("barcode"))
        if len(bc):
            pos_sorted = pos_sorted and _increasing(bc) and (last is None or bc[0] > last)
            last = bc[-1]
        if bc.dtype.itemsize > matrix.dtype.itemsize:  # longer than any matrix barcode: no match
            bc[np.char.str_len(bc) > matrix.dtype.itemsize] = b""
        bc = bc.astype(matrix.dtype)
        j = np.minimum(np.searchsorted(matrix, bc), max(n - 1, 0))
        hit = np.flatnonzero(matrix[j] == bc) if n else np.zeros(0, np.int64)
        col = j[hit] if order is None else order[j[hit]]
        found[col] = True
        in_tissue[col] = np.asarray(batch.column("in_tissue"), dtype=np.int64)[hit] == 1
        for k, name in enumerate(("array_row", "array_col")):
            rc[col, k] = np.asarray(batch.column(name), dtype=np.int64)[hit]
        for k, name in enumerate(("pxl_col_in_fullres", "pxl_row_in_fullres")):
            xy[col, k] = np.asarray(batch.column(name), dtype=np.float64)[hit]
    if not pos_sorted and _duplicate_positions(files.positions):
        raise UserError(f"{files.positions}: barcode: duplicate barcodes")
    missing = n - int(found.sum())
    if missing:
        first = barcodes[np.argmin(found)].decode()
        raise UserError(f"{files.matrix}: matrix/barcodes: {missing} barcodes not in {files.positions.name} (e.g. {first})")
    if not in_tissue.any():
        raise UserError(f"{files.positions}: in_tissue: no bin of the matrix is in tissue")
    del found, matrix
    rc, xy = rc[in_tissue], xy[in_tissue]
    width, height = image_size
    for axis, col, limit in ((0, "pxl_col_in_fullres", width), (1, "pxl_row_in_fullres", height)):
        bad = ~np.isfinite(xy[:, axis]) | (xy[:, axis] < 0) | (xy[:, axis] > limit)
        if bad.any():
            raise UserError(f"{files.positions}: {col}: {int(bad.sum())} tissue bins outside the image "
                            f"({width} x {height} px), e.g. {xy[bad][0, axis]}")
    return in_tissue, rc, xy


def read_bins(files: BinFiles, image_size: tuple[int, int], genes: np.ndarray | None, stats=None,
              with_barcodes: bool = True) -> Bins:
    """In-tissue bins with counts of ``genes`` (indices into the gene-expression features; None = none).

    ``stats(values, gene_index, libsize_per_value)`` is called per block with every count of every
    tissue bin (all genes), to accumulate per-gene statistics for gene selection. ``with_barcodes=False``
    leaves ``Bins.barcodes`` None (sharding does not need them; 2 um slides have millions).
    The counts are written into CSR arrays block by block (no COO triplets of the whole slide).
    """
    import scipy.sparse as sp  # start-up time: the CLI imports this module

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
        barcodes = barcodes[keep].astype(str) if with_barcodes else None
        gex_index = np.full(len(gex), -1, np.int64)
        gex_index[gex] = np.arange(int(gex.sum()))
        sel = np.full(len(gex), -1, np.int64)
        if genes is not None:
            sel[np.flatnonzero(gex)[genes]] = np.arange(len(genes))
        # at most every entry of a kept bin: pages past the entries written are never touched
        bound = int(np.diff(indptr)[keep].sum()) if genes is not None and len(genes) else 0
        values, gene_col, n_stored = np.empty(bound, np.float32), np.empty(bound, np.int32), 0
        per_bin = np.zeros(len(keep), np.int64)
        libsize = np.zeros(len(keep))
        for start in range(0, len(keep), BLOCK):
            stop = min(start + BLOCK, len(keep))
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
            k = int(s.sum())
            values[n_stored:n_stored + k] = data[s]
            gene_col[n_stored:n_stored + k] = sel[feat[s]]
            per_bin[start:stop] = np.bincount(col[s] - start, minlength=stop - start)
            n_stored += k
    values.resize(n_stored, refcheck=False)
    gene_col.resize(n_stored, refcheck=False)
    bin_ptr = np.zeros(int(keep.sum()) + 1, np.int64)
    np.cumsum(per_bin[keep], out=bin_ptr[1:])
    counts = sp.csr_matrix((values, gene_col, bin_ptr), shape=(len(bin_ptr) - 1, 0 if genes is None else len(genes)))
    counts.sum_duplicates()  # sorted gene indices, as the matrix has them; a no-op then
    return Bins(barcodes=barcodes, rc=rc, xy=xy, libsize=libsize[keep], counts=counts)

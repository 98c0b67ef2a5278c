"""Space Ranger 4's cell segmentation of a synthetic slide (``outs/segmented_outputs/``), from its own cells.

Space Ranger 4 segments nuclei on the H&E image, expands them into cells and assigns every 2 um bin to at
most one cell; the counts of a cell are the sum of its bins' counts. Here the cells are the generator's
own: a nucleus is the ellipse the image renders (magnet/synth/render.py), a cell the ellipse that holds its
nucleus and cytoplasm, both shrunk where needed so that no two cells overlap (every semi-axis at most half
the distance to the nearest cell), and a 2 um bin under tissue belongs to the cell whose ellipse holds its
centre. Red blood cells (no nucleus) are not segmented.

* ``cell_segmentations.geojson``, ``nucleus_segmentations.geojson``: one Polygon per cell (24 vertices around
  the ellipse), full-resolution pixel (x, y) coordinates, property ``cell_id`` (an integer from 1);
* ``filtered_feature_cell_matrix.h5``: the 10x HDF5 matrix of the cells' counts, barcodes
  ``cellid_{id:09d}-1``;
* ``barcode_mappings.parquet``: every 2 um bin (row-major), its ``square_002um``/``square_008um``/
  ``square_016um`` barcodes, ``cell_id`` (null outside cells), ``in_nucleus`` and ``in_cell``, as Space Ranger 4
  writes it;
* ``spatial/``: the scale factors and tissue images of the 2 um bins (the scverse reader needs the former).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.spatial import cKDTree

from magnet.spaceranger_layout import Outs
from magnet.synth import spaceranger
from magnet.synth.grid import BIN_SIZES_UM, BinGrid
from magnet.synth.tissue import MORPH, TYPES, Cells

VERTICES = 24
ROW_BLOCK = 1 << 20  # 2 um bins assigned per block (bounded memory on full-size slides)


def cell_barcodes(ids: np.ndarray) -> np.ndarray:
    return np.array([f"cellid_{i:09d}-1" for i in ids.tolist()], dtype="S")


@dataclasses.dataclass
class Segmentation:
    """The segmented cells (``source``: their rows in :class:`Cells`) with ``id`` 1..n and their ellipses (um,
    image frame): cell semi-axes ``cell_a`` (along ``angle``) and ``cell_b``; nucleus semi-axes ``nuc_a``,
    ``nuc_b``, centred ``nuc_offset`` along ``angle``. ``bin_cell`` (n2 * n2,) int32: each 2 um bin's cell row
    (-1: none), ``in_nucleus`` (n2 * n2,) bool."""

    source: np.ndarray
    x: np.ndarray
    y: np.ndarray
    angle: np.ndarray
    cell_a: np.ndarray
    cell_b: np.ndarray
    nuc_a: np.ndarray
    nuc_b: np.ndarray
    nuc_offset: np.ndarray
    bin_cell: np.ndarray
    in_nucleus: np.ndarray

    @property
    def ids(self) -> np.ndarray:
        return np.arange(1, len(self.source) + 1)


def _local(seg_x, seg_y, angle, px, py):
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = px - seg_x, py - seg_y
    return dx * c + dy * s, dy * c - dx * s


def segment(cells: Cells, grid: BinGrid, in_tissue_2um: np.ndarray) -> Segmentation:
    """Ellipses of the nucleated cells, and the 2 um bins under tissue each one holds (cells holding none
    are left out)."""
    t = cells.type.astype(np.int64)
    nucleated = np.flatnonzero(t != TYPES.index("rbc"))
    t, size = t[nucleated], cells.size[nucleated].astype(np.float64)
    x, y, angle = (getattr(cells, k)[nucleated].astype(np.float64) for k in ("x", "y", "angle"))
    nuc_a, nuc_b, off = MORPH["nuc_a"][t] * size, MORPH["nuc_b"][t] * size, MORPH["offset"][t] * size
    cell_a = np.maximum(MORPH["cyto_r"][t] * size, nuc_a + off)
    cell_b = np.maximum(0.85 * MORPH["cyto_r"][t] * size, nuc_b)
    dist, _ = cKDTree(np.c_[x, y]).query(np.c_[x, y], k=2)
    shrink = np.minimum(1.0, 0.5 * dist[:, 1] / cell_a)  # cell_a >= cell_b: no two ellipses overlap
    cell_a, cell_b, nuc_a, nuc_b, off = (v * shrink for v in (cell_a, cell_b, nuc_a, nuc_b, off))

    n2 = grid.n2
    bin_cell = np.full(n2 * n2, -1, np.int32)
    in_nucleus = np.zeros(n2 * n2, bool)
    tree = cKDTree(np.c_[x, y])
    reach = float(cell_a.max()) if len(x) else 0.0
    _, _, bx, by = grid.centres_um(2)
    for start in range(0, n2 * n2, ROW_BLOCK):
        sl = slice(start, min(start + ROW_BLOCK, n2 * n2))
        px, py = bx[sl], by[sl]
        dist, near = tree.query(np.c_[px, py], k=min(4, len(x)), distance_upper_bound=reach)
        near, dist = near.reshape(len(px), -1), dist.reshape(len(px), -1)
        for j in range(near.shape[1]):
            ok = np.isfinite(dist[:, j]) & (bin_cell[sl] < 0) & in_tissue_2um[sl]
            k = near[ok, j]
            u, v = _local(x[k], y[k], angle[k], px[ok], py[ok])
            inside = (u / cell_a[k]) ** 2 + (v / cell_b[k]) ** 2 <= 1
            rows = np.flatnonzero(ok)[inside] + start
            bin_cell[rows] = k[inside]
            in_nucleus[rows] = ((u[inside] - off[k][inside]) / nuc_a[k][inside]) ** 2 + (
                v[inside] / nuc_b[k][inside]) ** 2 <= 1
    held = np.bincount(bin_cell[bin_cell >= 0], minlength=len(x)) > 0
    renumber = np.full(len(x) + 1, -1, np.int32)  # index -1 (no cell) stays -1
    renumber[:-1][held] = np.arange(int(held.sum()), dtype=np.int32)
    keep = np.flatnonzero(held)
    return Segmentation(nucleated[keep], x[keep], y[keep], angle[keep], cell_a[keep], cell_b[keep], nuc_a[keep],
                        nuc_b[keep], off[keep], renumber[bin_cell], in_nucleus)


def _polygon(cx, cy, angle, a, b, shift, mpp) -> list:
    phi = np.linspace(0, 2 * np.pi, VERTICES, endpoint=False)
    out = 1 / np.cos(np.pi / VERTICES)  # vertices just outside: the polygon holds the whole ellipse
    u, v = shift + out * a * np.cos(phi), out * b * np.sin(phi)
    c, s = np.cos(angle), np.sin(angle)
    px, py = (cx + u * c - v * s) / mpp, (cy + u * s + v * c) / mpp
    ring = np.round(np.c_[px, py], 3).tolist()
    return [ring + ring[:1]]


def _geojson(path: Path, seg: Segmentation, a, b, shift, mpp: float) -> None:
    features = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": _polygon(
        seg.x[i], seg.y[i], seg.angle[i], a[i], b[i], shift[i], mpp)}, "properties": {"cell_id": int(seg.ids[i])}}
        for i in range(len(seg.source))]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))


def cell_counts(seg: Segmentation, counts, n_genes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse (cell, gene, count) triples sorted by cell then gene: the sums of the cells' 2 um bins."""
    bins2, genes, count = counts
    cell = seg.bin_cell[bins2]
    ok = cell >= 0
    key, inverse = np.unique(cell[ok].astype(np.int64) * n_genes + genes[ok], return_inverse=True)
    total = np.bincount(inverse, weights=count[ok]).astype(np.int32)
    return key // n_genes, (key % n_genes).astype(np.int32), total


def _mappings(path: Path, seg: Segmentation, grid: BinGrid) -> None:
    n2 = grid.n2
    rows, cols = np.divmod(np.arange(n2 * n2, dtype=np.int64), n2)
    columns = {f"square_{b:03d}um": spaceranger.barcodes(b, rows // (b // 2), cols // (b // 2)).astype(str)
               for b in BIN_SIZES_UM}
    in_cell = seg.bin_cell >= 0
    ids = np.where(in_cell, seg.bin_cell + 1, 0)
    names = cell_barcodes(np.arange(len(seg.source) + 1)).astype(str)
    columns["cell_id"] = pa.array(names[ids], mask=~in_cell)
    columns["in_nucleus"] = seg.in_nucleus
    columns["in_cell"] = in_cell
    pq.write_table(pa.table(columns), path, compression="zstd")


def write_segmented_outputs(outs: Path, seg: Segmentation, grid: BinGrid, mpp: float, counts, gene_ids: list[str],
                            gene_names: list[str], png_bytes: dict, png_scales: dict) -> None:
    """``outs/segmented_outputs/`` (see the module docstring)."""
    layout = Outs(outs)
    folder = layout.segmented
    (folder / "spatial").mkdir(parents=True)
    for name, data in png_bytes.items():
        (folder / "spatial" / name).write_bytes(data)
    spaceranger.write_json(layout.segmented_spatial / Outs.SCALEFACTORS, spaceranger.scalefactors(2, mpp, png_scales))
    _geojson(layout.cell_segmentations, seg, seg.cell_a, seg.cell_b, np.zeros(len(seg.source)), mpp)
    _geojson(layout.nucleus_segmentations, seg, seg.nuc_a, seg.nuc_b, seg.nuc_offset, mpp)
    cell, gene, count = cell_counts(seg, counts, len(gene_ids))
    spaceranger.write_matrix_h5(layout.cell_matrix, cell_barcodes(seg.ids), gene_ids, gene_names, cell, gene, count)
    _mappings(layout.barcode_mappings, seg, grid)

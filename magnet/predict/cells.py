"""Expression per cell from a 2 um prediction: the bins of each cell pooled, as Space Ranger 4 pools counts.

Cells come from Space Ranger 4's segmentation (``outs/segmented_outputs/barcode_mappings.parquet``: each 2 um
bin's cell) or, for an H&E-only slide, from polygons in a GeoJSON file (any segmenter; full-resolution pixel
coordinates, one Polygon or MultiPolygon per feature, ``properties.cell_id`` or the feature's position as its
id): a bin belongs to the first polygon holding its centre.

A bin's prediction ``x`` (normalisation ``log1p_libsize``) is the normalised value of its expected counts,
``log1p(rate * target_sum)`` with ``rate`` the expected share of the bin's counts per gene; a cell's expected
counts are the sum of its bins', so with equal library sizes its normalised value is ``log1p(mean(expm1(x)))``
over its bins (``layers['rate']``: the mean rate). A count model's bins pool their own rates, weighted by their
predicted library sizes where the model predicts them (``loss.libsize``), so its cells hold the normalised value
of their expected counts. The cells' .h5ad is written from the bins' .h5ad block by block (O(cells x genes)
memory, never the bins x genes matrix).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from magnet.io import atomic_path
from magnet.spaceranger_layout import Outs

SEGMENTATION = "spaceranger"  # --cells spaceranger: Space Ranger 4's own segmentation
BLOCK_ROWS = 1 << 16


def spaceranger_cells(outs: Path, rc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell ids, sorted; each 2 um bin's index among them or -1) from Space Ranger 4's barcode mappings, for the
    bins at ``rc`` (array_row, array_col). Matched on (row, col) read out of the barcodes, not on the strings: a
    6.5 mm capture area maps 11 million barcodes, which as Python strings and a dict took 4 GB."""
    import pyarrow.compute as pc  # start-up time: the CLI imports this module
    import pyarrow.parquet as pq

    path = Outs(outs).barcode_mappings
    if not path.is_file():
        raise UserError(f"{path}: --cells: no Space Ranger 4 segmentation there (give the cells as GeoJSON)")
    column = Outs.square(2)
    table = pq.read_table(path, columns=[column, "cell_id"])
    table = table.filter(pc.is_valid(table["cell_id"]))
    parts = pc.extract_regex(table[column], r"^s_002um_(?P<row>\d+)_(?P<col>\d+)-\d+$")
    if parts.null_count:
        bad = table[column].filter(pc.is_null(parts))[0]
        raise UserError(f"{path}: {column}: '{bad}' is not a 2 um barcode (s_002um_ROW_COL-1)")
    key = _key(pc.struct_field(parts, "row").to_numpy().astype(np.int64),
               pc.struct_field(parts, "col").to_numpy().astype(np.int64))
    encoded = pc.dictionary_encode(table["cell_id"]).combine_chunks()
    ids, rank = np.unique(encoded.dictionary.to_numpy(zero_copy_only=False).astype(str), return_inverse=True)
    code = rank[encoded.indices.to_numpy()]
    del table, parts, encoded
    by_key = np.argsort(key, kind="stable")
    key = key[by_key]
    want = _key(rc[:, 0].astype(np.int64), rc[:, 1].astype(np.int64))
    at = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
    found = (key[at] == want) if len(key) else np.zeros(len(want), bool)
    return ids, np.where(found, code[by_key[at]] if len(key) else -1, -1).astype(np.int64)


def _key(row: np.ndarray, col: np.ndarray) -> np.ndarray:
    return row.astype(np.int64) << 32 | col.astype(np.int64)


def _rings(geometry: dict) -> list[np.ndarray]:
    polys = [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
    return [np.asarray(ring, np.float64)[:, :2] for poly in polys for ring in poly]


def _inside(rings: list[np.ndarray], pts: np.ndarray) -> np.ndarray:
    """Even-odd rule over all rings (holes included). Own code: no polygon library is a core dependency."""
    hit = np.zeros(len(pts), bool)
    for ring in rings:
        a, b = ring, np.roll(ring, -1, axis=0)
        for (x1, y1), (x2, y2) in zip(a, b):
            cross = (y1 > pts[:, 1]) != (y2 > pts[:, 1])
            with np.errstate(divide="ignore", invalid="ignore"):
                x_at = x1 + (pts[:, 1] - y1) * (x2 - x1) / (y2 - y1)
            hit ^= cross & (pts[:, 0] < x_at)
    return hit


def geojson_cells(path: Path, xy_px: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell ids, each bin's index among them or -1): the first polygon of ``path`` holding the bin's centre."""
    try:
        doc = json.loads(Path(path).read_text())
        features = doc["features"] if doc.get("type") == "FeatureCollection" else [doc]
        shapes = [(f.get("properties") or {}).get("cell_id", i + 1) for i, f in enumerate(features)], \
            [_rings(f["geometry"]) for f in features]
    except FileNotFoundError:
        raise UserError(f"{path}: --cells: file not found") from None
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path}: --cells: not GeoJSON polygons ({type(e).__name__}: {e})") from None
    ids, rings = shapes
    if not rings:
        raise UserError(f"{path}: --cells: no polygon")
    order = np.argsort(xy_px[:, 0], kind="stable")
    sx = xy_px[order, 0]
    cell = np.full(len(xy_px), -1, np.int64)
    for i, rs in enumerate(rings):
        lo, hi = min(r[:, 0].min() for r in rs), max(r[:, 0].max() for r in rs)
        cand = order[np.searchsorted(sx, lo):np.searchsorted(sx, hi, side="right")]
        y0, y1 = min(r[:, 1].min() for r in rs), max(r[:, 1].max() for r in rs)
        cand = cand[(xy_px[cand, 1] >= y0) & (xy_px[cand, 1] <= y1) & (cell[cand] < 0)]
        cell[cand[_inside(rs, xy_px[cand])]] = i
    return np.array([str(c) for c in ids]), cell


def pool_cells(bins_h5ad: Path, cell: np.ndarray, n_cells: int, target_sum: float) -> tuple[np.ndarray, np.ndarray]:
    """(rate (n_cells, G) float32, bins per cell), read block by block: a count model's ``layers['rate']``
    averaged over the cell's bins, weighted by their ``obs['predicted_libsize']`` where the model predicts it;
    for other models ``expm1(X) / target_sum`` averaged."""
    import h5py  # start-up time: the CLI imports this module
    from anndata.io import read_elem

    with h5py.File(bins_h5ad, "r") as f:
        counted = "rate" in f["layers"]
        X = f["layers"]["rate"] if counted else f["X"]
        weight = (read_elem(f["obs"]["predicted_libsize"]).astype(np.float64) if "predicted_libsize" in f["obs"]
                  else np.ones(X.shape[0]))
        total = np.zeros((n_cells, X.shape[1]), np.float64)
        for start in range(0, X.shape[0], BLOCK_ROWS):
            c = cell[start:start + BLOCK_ROWS]
            keep = c >= 0
            if keep.any():
                block = X[start:start + len(c)][keep].astype(np.float64)
                rate = block if counted else np.expm1(block) / target_sum
                np.add.at(total, c[keep], rate * weight[start:start + len(c)][keep, None])
    cells = cell >= 0
    n = np.bincount(cell[cells], minlength=n_cells)
    w = np.bincount(cell[cells], weights=weight[cells], minlength=n_cells)
    return np.divide(total, w[:, None], out=np.zeros_like(total), where=w[:, None] > 0).astype(np.float32), n


def write_cells(bins_h5ad: Path, out: Path, cells: str, spaceranger: Path | None) -> dict:
    """The per-cell .h5ad of the 2 um prediction ``bins_h5ad`` (written atomically): ``X`` normalised like the
    bins, ``layers['rate']``, ``obs`` (cell_id, n_bins), ``obsm['spatial']`` (mean bin centre, full-res px),
    ``var`` and ``uns['magnet']`` as the bins'."""
    # start-up time: the CLI imports this module
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import read_elem

    with h5py.File(bins_h5ad, "r") as f:  # not the obs table: millions of barcode strings
        var = read_elem(f["var"])
        magnet = {k: read_elem(f["uns"]["magnet"][k]) for k in ("units", "bin_um", "model")
                  if k in f["uns"]["magnet"]}
        xy = f["obsm"]["spatial"][:]
        rc = np.stack([read_elem(f["obs"][k]) for k in ("array_row", "array_col")], 1)
    units, bin_um = magnet["units"], int(magnet["bin_um"])
    if bin_um != 2:
        raise UserError(f"{bins_h5ad}: --cells: cells are pooled from 2 um bins, not {bin_um} um ones")
    if units.get("method") != "log1p_libsize":
        raise UserError(f"{bins_h5ad}: --cells: pooling needs log1p_libsize units, not {units.get('method')}")
    if cells == SEGMENTATION:
        if spaceranger is None:
            raise UserError("--cells: Space Ranger's segmentation needs --spaceranger (else give a GeoJSON file)")
        ids, cell = spaceranger_cells(spaceranger, rc)
    else:
        ids, cell = geojson_cells(Path(cells), xy)
    held = np.unique(cell[cell >= 0])
    if not len(held):
        raise UserError(f"{cells}: --cells: no cell holds a predicted bin")
    remap = np.full(len(ids), -1, np.int64)
    remap[held] = np.arange(len(held))
    cell = np.where(cell >= 0, remap[np.maximum(cell, 0)], -1)
    rate, n = pool_cells(bins_h5ad, cell, len(held), float(units["target_sum"]))
    centre = np.zeros((len(held), 2))
    np.add.at(centre, cell[cell >= 0], xy[cell >= 0])
    adata = ad.AnnData(X=np.log1p(rate * np.float32(units["target_sum"])), layers={"rate": rate},
                       obs=pd.DataFrame({"n_bins": n}, index=pd.Index(ids[held], name="cell_id")), var=var,
                       obsm={"spatial": centre / n[:, None]},
                       uns={"magnet": {**magnet, "cells": "spaceranger segmentation" if cells == SEGMENTATION
                                       else str(Path(cells).resolve()), "bins": str(Path(bins_h5ad).resolve())}})
    with atomic_path(Path(out)) as tmp:
        adata.write_h5ad(tmp)
    return {"cells_out": str(out), "cells": int(len(held)), "bins_in_cells": int(n.sum())}

"""Generate a cohort: one folder per slide in the Space Ranger HD layout, plus a samplesheet.

    DIR/samplesheet.csv                     slide,spaceranger,image (paths relative to DIR)
    DIR/config.yaml                         the resolved SynthConfig
    DIR/<slide>/<slide>_fullres.tif         tiled pyramidal BigTIFF, resolution tags in px/cm
    DIR/<slide>/outs/feature_slice.h5       2 um counts per gene, masks, metadata (HD layout, transforms)
    DIR/<slide>/outs/spatial/               hires/lowres PNGs, scalefactors_json.json (2 um bins)
    DIR/<slide>/outs/binned_outputs/square_{002,008,016}um/
        {filtered,raw}_feature_bc_matrix.h5
        spatial/{tissue_positions.parquet,scalefactors_json.json,tissue_hires_image.png,tissue_lowres_image.png}
    DIR/<slide>/ground_truth/expected_{008,016}um.h5   barcodes, genes, gene_ids, expected (float32
                                            bins x genes Poisson means, filtered-matrix order)
    DIR/<slide>/ground_truth/local_expected_{008,016}um.h5   the same for the local oracle: each cell's
                                            context factor replaced by its type's mean (expression.py)
    DIR/<slide>/ground_truth/gene_groups.csv  gene,group (marker, context_mix, context_short,
                                            context_long, housekeeping), one row per gene in matrix order
    DIR/<slide>/outs/segmented_outputs/     Space Ranger 4's cell segmentation of the slide's own cells
                                            (magnet/synth/segmentation.py)
    DIR/<slide>/ground_truth/cells.parquet  every cell: centre (um and full-res px), type, size, segmented_cell_id
    DIR/<slide>/ground_truth/expected_cells.h5   barcodes (cellid_...-1), genes, gene_ids, expected (float32
                                            cells x genes Poisson means of the segmented cells' counts)

The whole cohort is written under a temporary name and renamed at the end: a failed run leaves
nothing behind.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from magnet.config import save_config
from magnet.errors import UserError
from magnet.io import atomic_path, check_writable
from magnet.spaceranger_layout import Outs
from magnet.synth import expression, feature_slice, segmentation, spaceranger, tissue, wsi
from magnet.synth.config import SynthConfig
from magnet.synth.grid import BIN_SIZES_UM, BinGrid, random_grid
from magnet.synth.render import random_stain, render_blocks

GROUND_TRUTH_BINS_UM = (8, 16)  # 2 um means would be a dense ~1e6 x genes matrix per mm^2: not written


def slide_name(index: int) -> str:
    return f"synth_{index:03d}"


def _sum_blocks(counts, n2: int, f: int, n_genes: int):
    """Sum sorted 2 um triples over f x f blocks, one band of f rows at a time (bounded memory)."""
    bins2, genes, count = counts
    n = n2 // f
    bounds = np.searchsorted(bins2, np.arange(n + 1) * f * n2)
    parts = []
    for r in range(n):
        s, e = bounds[r], bounds[r + 1]
        key, inverse = np.unique((bins2[s:e] % n2 // f) * n_genes + genes[s:e], return_inverse=True)
        parts.append((r * n + key // n_genes, key % n_genes, np.bincount(inverse, weights=count[s:e]).astype(np.int32)))
    return tuple(np.concatenate(p) for p in zip(*parts))


def _bin_level(outs: Path, bin_um: int, grid: BinGrid, fields: tissue.Fields, counts, programs,
               mpp: float, png_bytes: dict, png_scales: dict) -> np.ndarray:
    """Write one ``square_XXXum`` folder; return its row-major in-tissue flags."""
    bins2, genes, count = counts
    n2, n = grid.n2, grid.n_side(bin_um)
    if bin_um == 2:
        col_bin, gene, cnt = bins2, genes, count
    else:
        col_bin, gene, cnt = _sum_blocks(counts, n2, bin_um // 2, len(programs.gene_ids))
    rows, cols, x, y = grid.centres_um(bin_um)
    in_tissue = tissue.sample_bilinear(fields.tissue_score, fields.res_um, x, y) > 0
    codes = spaceranger.barcodes(bin_um, rows, cols)
    layout = Outs(outs)
    spatial = layout.bin_spatial(bin_um)
    spatial.mkdir(parents=True)
    spaceranger.write_matrix_h5(layout.bin_raw_matrix(bin_um), codes, programs.gene_ids,
                                programs.gene_names, col_bin, gene, cnt)
    keep = in_tissue[col_bin]
    filtered_index = np.cumsum(in_tissue) - 1
    spaceranger.write_matrix_h5(layout.bin_matrix(bin_um), codes[in_tissue], programs.gene_ids,
                                programs.gene_names, filtered_index[col_bin[keep]], gene[keep], cnt[keep])
    spaceranger.write_positions(layout.bin_positions(bin_um), codes, in_tissue, rows, cols, y / mpp, x / mpp)
    spaceranger.write_json(layout.bin_scalefactors(bin_um), spaceranger.scalefactors(bin_um, mpp, png_scales))
    for name, data in png_bytes.items():
        (spatial / name).write_bytes(data)
    return in_tissue


def _write_ground_truth(folder: Path, expr: expression.SlideExpression, grid: BinGrid, in_tissue: dict,
                        mpp: float, seg: segmentation.Segmentation) -> None:
    folder.mkdir()
    programs = expr.programs
    with h5py.File(folder / "expected_cells.h5", "w") as f:
        f.attrs["description"] = "Poisson means of the segmented cells' counts (rows follow the cell matrix)"
        f.create_dataset("barcodes", data=segmentation.cell_barcodes(seg.ids), track_times=False)
        f.create_dataset("genes", data=np.array(programs.gene_names, dtype="S"), track_times=False)
        f.create_dataset("gene_ids", data=np.array(programs.gene_ids, dtype="S"), track_times=False)
        f.create_dataset("expected", data=expression.expected_by_group(expr, grid, 2, seg.bin_cell, len(seg.source)),
                         compression="gzip", compression_opts=1, shuffle=True, track_times=False)
    local = expr.local()
    for bin_um in GROUND_TRUTH_BINS_UM:
        rows, cols, _, _ = grid.centres_um(bin_um)
        keep = in_tissue[bin_um]
        for prefix, source, what in (("", expr, "Poisson means of the counts per bin"),
                                     ("local_", local, "Poisson means given only each bin's cells (local oracle)")):
            with h5py.File(folder / f"{prefix}expected_{bin_um:03d}um.h5", "w") as f:
                f.attrs["bin_size_um"] = bin_um
                f.attrs["description"] = f"{what} (rows follow the filtered matrix)"
                f.create_dataset("barcodes", data=spaceranger.barcodes(bin_um, rows[keep], cols[keep]),
                                 track_times=False)
                f.create_dataset("genes", data=np.array(programs.gene_names, dtype="S"), track_times=False)
                f.create_dataset("gene_ids", data=np.array(programs.gene_ids, dtype="S"), track_times=False)
                f.create_dataset("expected", data=expression.expected_counts(source, grid, bin_um, keep),
                                 compression="gzip", compression_opts=1, shuffle=True, track_times=False)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["gene", "group"], *zip(programs.gene_names, programs.groups)])
    (folder / "gene_groups.csv").write_text(buf.getvalue())
    cells = expr.cells
    segmented = np.zeros(len(cells), bool)
    segmented[seg.source] = True
    seg_id = np.zeros(len(cells), np.int64)
    seg_id[seg.source] = seg.ids
    pq.write_table(pa.table({
        "x_um": cells.x, "y_um": cells.y, "pxl_col_in_fullres": cells.x / mpp, "pxl_row_in_fullres": cells.y / mpp,
        "cell_type": pa.array(np.array(tissue.TYPES)[cells.type]), "size": cells.size,
        "segmented_cell_id": pa.array(segmentation.cell_barcodes(seg_id).astype(str), mask=~segmented),
    }), folder / "cells.parquet", compression="zstd")


def generate_slide(cfg: SynthConfig, programs: expression.Programs, index: int, slide_dir: Path) -> dict:
    """Write one slide into ``slide_dir`` (created); return seconds per stage and sizes."""
    times: dict = {}
    clock = [time.perf_counter()]

    def stage(name):
        now = time.perf_counter()
        times[name] = now - clock[0]
        clock[0] = now

    name = slide_name(index)
    rng_tissue, rng_grid, rng_stain, rng_expr = (
        np.random.default_rng(s) for s in np.random.SeedSequence([cfg.seed, 1, index]).spawn(4))
    fields = tissue.make_fields(cfg.tissue, cfg.size_um, rng_tissue)
    cells = tissue.place_cells(cfg.tissue, fields, cfg.size_um, rng_tissue)
    grid = random_grid(cfg.size_um, rng_grid)
    stage("tissue")

    side = int(round(cfg.size_um / cfg.mpp))
    slide_dir.mkdir(parents=True)
    blocks = render_blocks(cells, fields, random_stain(rng_stain), (side, side), cfg.mpp, cfg.tile_px,
                           (cfg.seed, 2, index))
    source, scale = wsi.write_pyramid(slide_dir / f"{name}_fullres.tif", blocks, (side, side), cfg.mpp,
                                      cfg.tile_px, cfg.image_compression, cfg.jpeg_quality)
    stage("image")
    tmp = slide_dir / ".png"
    tmp.mkdir()
    png_scales = wsi.write_spatial_pngs(tmp, source, scale, side)
    png_bytes = {p.name: p.read_bytes() for p in sorted(tmp.iterdir())}
    shutil.rmtree(tmp)
    del source
    stage("png")

    expr = expression.slide_expression(cfg.expression, programs, cells, fields, cfg.size_um, rng_expr)
    counts = expression.sample_counts(expr, grid, rng_expr)
    stage("counts")
    outs = slide_dir / Outs.OUTS
    in_tissue = {b: _bin_level(outs, b, grid, fields, counts, programs, cfg.mpp, png_bytes, png_scales)
                 for b in BIN_SIZES_UM}
    feature_slice.write_slide_outputs(outs, name, grid, cfg.mpp, counts, programs.gene_ids, programs.gene_names,
                                      in_tissue, png_bytes, png_scales)
    seg = segmentation.segment(cells, grid, in_tissue[2])
    segmentation.write_segmented_outputs(outs, seg, grid, cfg.mpp, counts, programs.gene_ids, programs.gene_names,
                                         png_bytes, png_scales)
    stage("spaceranger")
    _write_ground_truth(slide_dir / "ground_truth", expr, grid, in_tissue, cfg.mpp, seg)
    stage("ground_truth")
    return {"times": times, "image_px": side, "cells": len(cells), "umis": int(counts[2].sum()),
            "bins": {b: int(grid.n_side(b) ** 2) for b in BIN_SIZES_UM}, "segmented_cells": len(seg.source),
            "in_tissue": {b: int(v.sum()) for b, v in in_tissue.items()}}


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an out dir that exists non-empty (without ``overwrite``) or cannot be written."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"{out_dir}: --out: exists and is not a directory")
        if any(out_dir.iterdir()):
            if not overwrite:
                raise UserError(f"{out_dir}: --out: exists and is not empty (pass --overwrite to replace it)")
            if not ((out_dir / "samplesheet.csv").is_file() and (out_dir / "config.yaml").is_file()):
                raise UserError(f"{out_dir}: --out: --overwrite replaces only a folder written by magnet synth "
                                "(samplesheet.csv and config.yaml missing); refusing to delete it")
    check_writable(out_dir, "--out")


def generate_cohort(cfg: SynthConfig, out_dir: str | Path, overwrite: bool = False,
                    log: Callable[[str], None] | None = None) -> Path:
    """Write ``cfg.slides`` slides and ``samplesheet.csv`` into ``out_dir``; return the samplesheet path."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, overwrite)
    programs = expression.make_programs(cfg.expression, np.random.default_rng([cfg.seed, 0]))
    rows = []
    try:
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            for i in range(cfg.slides):
                name = slide_name(i)
                info = generate_slide(cfg, programs, i, tmp / name)
                rows.append([name, f"{name}/{Outs.OUTS}", f"{name}/{name}_fullres.tif"])
                if log:
                    log(f"{name}: {info['image_px']} px, {info['cells']} cells, {info['umis']} UMIs, "
                        f"{info['in_tissue'][8]} of {info['bins'][8]} 8 um bins in tissue, "
                        f"{sum(info['times'].values()):.1f} s")
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows([["slide", "spaceranger", "image"], *rows])
            (tmp / "samplesheet.csv").write_text(buf.getvalue())
            save_config(cfg, tmp / "config.yaml", command="magnet synth")
    except PermissionError as e:
        raise UserError(f"{out_dir}: --out: cannot write ({e.strerror})") from None
    return out_dir / "samplesheet.csv"

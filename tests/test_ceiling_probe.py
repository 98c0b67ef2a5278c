"""bench/ceiling_probe.py: cell counts and transcript mass in squares, and the ridge read-out it fits."""

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("ceiling_probe", REPO / "bench" / "ceiling_probe.py")
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def _cells(path: Path) -> Path:
    pd.DataFrame({"x_um": [10.2, 12.7, 30.5, 50.0, 100.0], "y_um": [10.4, 11.1, 30.2, 50.0, 100.0],
                  "pxl_col_in_fullres": 0.0, "pxl_row_in_fullres": 0.0,
                  "cell_type": ["tumour", "lymphocyte", "tumour", "fibroblast", "rbc"],
                  "size": np.array([1.0, 1.2, 0.9, 1.0, 1.0], np.float32)}).to_parquet(path)
    return path


def test_box_counts_count_cells_by_type_and_mass_spreads_their_library(tmp_path):
    cells = _cells(tmp_path / "cells.parquet")
    counts = probe.BoxCounts(cells)
    tum, lym, fib = (probe.TYPES.index(t) for t in ("tumour", "lymphocyte", "fibroblast"))
    got = counts(np.array([12.0, 30.0, 80.0]), np.array([12.0, 30.0, 80.0]), 8.0)
    assert got[0, tum] == 1 and got[0, lym] == 1 and got[1, tum] == 1 and got[2].sum() == 0
    mass = probe.BoxCounts(cells, mass=True)
    wide, narrow = mass(np.array([50.0]), np.array([50.0]), 60.0), mass(np.array([50.0]), np.array([50.0]), 4.0)
    assert abs(wide[0, fib] - 1.0) < 0.02  # the whole library of the cell (size 1) lies in a wide square
    assert 0.1 < narrow[0, fib] < 0.9  # a narrow one holds part of its spread transcripts


def test_ridge_read_out_recovers_a_smooth_function_of_the_features():
    rng = np.random.default_rng(0)
    slides = []
    for _ in range(3):
        x = rng.random((400, 3))
        y = np.stack([x[:, 0] + x[:, 1] ** 2, x[:, 2] * x[:, 0]], axis=1) + 0.01 * rng.standard_normal((400, 2))
        slides.append((x, y))
    f, alpha = probe.fit(slides[:2])
    assert alpha in probe.ALPHAS
    assert probe.gene_pcc(f(slides[2][0]), slides[2][1]).min() > 0.95
    assert abs(probe.gene_pcc(rng.random((400, 2)), slides[2][1])).max() < 0.2


def test_markers_are_grouped_by_the_cell_type_their_prefix_names():
    genes = ["TUM01", "FIB01", "TUM02", "MAC01", "HK001", "END01"]
    group = np.array(["marker", "marker", "marker", "marker", "housekeeping", "context_mix"])
    types = probe.marker_types(genes, group)
    assert list(types) == ["tumour", "fibroblast", "macrophage"]  # END01 is no marker here, rbc have none
    np.testing.assert_array_equal(types["tumour"], [0, 2])
    line = probe.type_line(np.array([0.9, 0.5, 0.7, 0.2, 0.0, 0.0]), types)
    assert "tumour 0.800" in line and "fibroblast 0.500" in line and "macrophage 0.200" in line

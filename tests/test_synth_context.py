"""The context benchmark of ``magnet synth`` (configs/synth/context.yaml): gene groups, range programs
and the local oracle (expected counts from each bin's own cells alone)."""

import csv
from pathlib import Path

import h5py
import numpy as np
import pytest
import scanpy as sc

from magnet.cli import main
from magnet.config import load_config
from magnet.synth import SynthConfig
from magnet.synth.expression import make_programs, range_activity, slide_expression
from magnet.synth.tissue import TYPES, Cells, Fields

REPO = Path(__file__).resolve().parents[1]
CONTEXT = REPO / "configs/synth/context.yaml"


@pytest.fixture(scope="module")
def context_cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("context") / "c"
    assert main(["synth", "--config", str(CONTEXT), "--slides", "1", "--size-um", "600", "--out", str(out)]) == 0
    return out / "synth_000"


def _groups(slide: Path) -> list[tuple[str, str]]:
    with open(slide / "ground_truth" / "gene_groups.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["gene", "group"]
    return [tuple(r) for r in rows[1:]]


def test_gene_groups_follow_the_config(context_cohort, tiny_cohort):
    cfg = load_config(SynthConfig, CONTEXT, []).expression
    rows = _groups(context_cohort)
    filt = sc.read_10x_h5(context_cohort / "outs/binned_outputs/square_016um/filtered_feature_bc_matrix.h5")
    assert [g for g, _ in rows] == list(filt.var_names)
    groups = np.array([grp for _, grp in rows])
    counts = {k: int((groups == k).sum()) for k in set(groups)}
    assert counts == {"marker": 6 * cfg.markers_per_type, "context_mix": 7 * cfg.genes_per_context_program,
                      "context_short": cfg.short_range_genes, "context_long": cfg.long_range_genes,
                      "housekeeping": cfg.n_genes - 6 * cfg.markers_per_type - 7 * cfg.genes_per_context_program
                      - cfg.short_range_genes - cfg.long_range_genes}
    assert all(g.startswith("SHR") for g, grp in rows if grp == "context_short")
    # a cohort without range genes (the tiny test cohort) has no such groups
    assert {grp for _, grp in _groups(tiny_cohort / "synth_000")} == {"marker", "context_mix", "housekeeping"}


def _normalised(m: np.ndarray) -> np.ndarray:
    return np.log1p(m / m.sum(1, keepdims=True) * 1e4)


def _pcc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def test_local_oracle_keeps_the_markers_and_misses_the_context(context_cohort):
    """Per gene across 16 um bins: the local oracle follows the full one for markers, not for range genes;
    against Poisson draws of the counts, oracle minus local oracle is ~0 for markers and large for context."""
    truth = context_cohort / "ground_truth"
    with h5py.File(truth / "local_expected_016um.h5") as f, h5py.File(truth / "expected_016um.h5") as g:
        assert f["barcodes"][:].tolist() == g["barcodes"][:].tolist() and f["genes"][:].tolist() == g["genes"][:].tolist()
        means, local = g["expected"][:].astype(np.float64), f["expected"][:].astype(np.float64)
    assert means.sum() == pytest.approx(local.sum(), rel=0.05)  # the type means keep the slide's total
    cells = means.sum(1) > 20  # bins holding cells
    means, local = means[cells], local[cells]
    groups = np.array([grp for _, grp in _groups(context_cohort)])
    agree = _pcc(_normalised(means), _normalised(local))
    assert np.median(agree[groups == "marker"]) > 0.9  # not 1: the range genes move the library size
    assert np.median(agree[groups == "context_short"]) < 0.8 and np.median(agree[groups == "context_long"]) < 0.8

    rng = np.random.default_rng(0)
    counts = rng.poisson(means)
    target = np.log1p(counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4)
    gap = _pcc(_normalised(means), target) - _pcc(_normalised(local), target)
    assert abs(gap[groups == "marker"].mean()) < 0.03
    assert gap[groups == "context_short"].mean() > 0.25 and gap[groups == "context_long"].mean() > 0.25


def _fields(label: np.ndarray, res: float) -> Fields:
    z = np.zeros(label.shape, np.float32)
    return Fields(res, z + 1, label.astype(np.int8), z, z, z, z, z)


def _line_of_cells(x: np.ndarray, y: float, types: np.ndarray) -> Cells:
    n = len(x)
    return Cells(x.astype(np.float64), np.full(n, y), types.astype(np.int8), np.ones(n, np.float32),
                 np.zeros(n, np.float32))


def test_short_range_activity_is_the_distance_to_the_interface():
    cfg = load_config(SynthConfig, CONTEXT, []).expression
    near, far = cfg.short_range_um
    res, n = 4.0, 101
    label = np.zeros((n, n))
    label[:, :50] = 1  # tumour left of x = 198 um (grid points 0..49), stroma right
    x = np.linspace(2, 398, 300)
    act = range_activity(cfg, "short", _fields(label, res), _line_of_cells(x, 200.0, np.zeros(300)))
    s = np.clip((far - np.abs(x - 198.0)) / (far - near), 0, 1)
    np.testing.assert_allclose(act, s * s * (3 - 2 * s), atol=0.15)  # distances on a 4 um grid
    assert (act[np.abs(x - 198) < near - 4] == 1).all() and (act[np.abs(x - 198) > far + 4] == 0).all()


def test_long_range_activity_falls_with_the_distance_to_an_aggregate():
    cfg = load_config(SynthConfig, CONTEXT, []).expression
    res, n = 4.0, 301
    label = np.zeros((n, n))
    yy, xx = np.mgrid[:n, :n] * res
    label[(xx - 600) ** 2 + (yy - 600) ** 2 < 60**2] = 2  # one immune aggregate of 120 um at the centre
    x = np.arange(600, 1200, 20.0)
    act = range_activity(cfg, "long", _fields(label, res), _line_of_cells(x, 600.0, np.zeros(len(x))))
    assert act[0] == 1 and act[-1] == 0  # inside it, and beyond 3 sd of the kernel
    assert (np.diff(act) <= 1e-9).all() and 0 < act[(x > 700) & (x < 850)].mean() < 1  # 100-250 um away


def test_local_oracle_replaces_context_by_the_type_mean():
    cfg = load_config(SynthConfig, CONTEXT, [])
    programs = make_programs(cfg.expression, np.random.default_rng(0))
    res, n = 4.0, 101
    label = np.zeros((n, n))
    label[:, :50] = 1
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 400, 500)
    types = rng.integers(0, len(TYPES) - 1, 500)  # expressing types only
    cells = _line_of_cells(np.sort(x), 200.0, types)
    expr = slide_expression(cfg.expression, programs, cells, _fields(label, res), 400.0, rng)
    full, local = expr.rates(slice(0, 500)), expr.local().rates(slice(0, 500))
    short = [i for i, g in enumerate(programs.groups) if g == "context_short"]
    for t in np.unique(types):
        of_type = cells.type == t
        # equal sizes: each type's total is kept, and every cell of the type gets its mean
        np.testing.assert_allclose(local[of_type].sum(0), full[of_type].sum(0), rtol=1e-4)
        np.testing.assert_allclose(local[of_type], np.broadcast_to(local[of_type].mean(0), local[of_type].shape),
                                   rtol=1e-5)
        assert full[of_type][:, short].std(0).mean() > 0  # the full rates vary with the distance

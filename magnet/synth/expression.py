"""Gene programs and counts.

Programs are drawn once per cohort: a baseline profile, marker genes per cell type, and context
programs whose activity in a cell depends on the cell-type composition of its neighbourhood
(Gaussian-weighted, radius ``context_radius_um``). A slide adds a library-size factor and a per-gene
batch effect. Each cell's expected counts (Poisson means) are then

    rate[c, g] = lib[c] * profile[type c, g] * batch[g] * exp(sum_k act[c, k] * lfc[k, g])

with ``act`` zero where the cell's type does not respond to program ``k``. Range programs (optional, the
context benchmark) add two activities to which every expressing type responds alike: ``short``, from the
distance to the tumour-stroma interface (full within ``short_range_um[0]``, none beyond ``[1]``), and
``long``, from the immune-aggregate share of the tissue under a Gaussian of sd ``long_range_sd_um``.
Each gene has a group (``GROUPS``): its program's range, which the ground truth records.

The local oracle (:meth:`SlideExpression.local`) replaces each cell's context factor
``exp(act[c] @ lfc)`` by its mean over the slide's cells of the same type: the expected counts given
only the cells in the bin (their types, sizes and the slide effects), from the generator's own
quantities. Per gene, oracle minus local oracle is what context can add. Counts are Poisson per
cell and gene; each transcript lands at the cell centre plus Gaussian scatter (cell size and
diffusion) and is counted in the 2 um bin that holds it. Expected counts per bin integrate the same
Gaussian over each bin, so they are the exact means of the binned counts.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
from scipy import ndimage, sparse
from scipy.special import ndtr

from magnet.errors import UserError
from magnet.synth.config import ExpressionConfig
from magnet.synth.grid import BinGrid
from magnet.synth.tissue import GLASS, MORPH, N_EXPRESSING, TYPES, Cells, Fields, sample_bilinear

TYPE_PREFIX = ("TUM", "FIB", "LYM", "MAC", "END", "PLA")
# relative library size per expressing type (multiplied by umis_per_cell and cell area)
TYPE_LIBRARY = np.array([1.4, 0.75, 0.45, 1.1, 0.7, 1.2])
# name, responding types, driver weights on neighbourhood fractions, activity ramp (lo, hi)
CONTEXT_PROGRAMS = (
    ("IFN", ("tumour", "macrophage"), {"lymphocyte": 1.0, "plasma": 1.0}, 0.05, 0.35),
    ("HYP", ("tumour",), {"tumour": 1.0, "endothelial": -5.0}, 0.45, 0.85),
    ("CAF", ("fibroblast",), {"tumour": 1.0}, 0.05, 0.4),
    ("TAM", ("macrophage",), {"tumour": 1.0}, 0.1, 0.5),
    ("EXH", ("lymphocyte",), {"tumour": 1.0}, 0.05, 0.4),
    ("ANG", ("endothelial",), {"tumour": 1.0}, 0.03, 0.3),
    ("EMT", ("tumour",), {"fibroblast": 1.0}, 0.05, 0.35),
)
CELL_CHUNK = 8192
# gene groups in gene order; context_short / context_long only with range genes in the config
GROUPS = ("marker", "context_mix", "context_short", "context_long", "housekeeping")
RANGE_PREFIX = {"short": "SHR", "long": "LNG"}
RANGE_BASE = 0.5  # log offset of range genes, so they are among the well-expressed genes


@dataclasses.dataclass
class Programs:
    """Cohort-wide gene programs."""

    gene_ids: list[str]
    gene_names: list[str]
    profile: np.ndarray  # (N_EXPRESSING, G) float32, rows sum to 1
    context_lfc: np.ndarray  # (K, G) float32 log fold change of each context program
    responds: np.ndarray  # (len(TYPES), K) float32 1 where a type responds to a program
    drivers: np.ndarray  # (len(TYPES), K) float32 weights on neighbourhood fractions
    ramp: np.ndarray  # (2, K) activity ramp
    groups: list[str]  # per gene, one of GROUPS
    ranges: tuple[str, ...] = ()  # range programs ("short", "long"), the last rows of context_lfc


def make_programs(cfg: ExpressionConfig, rng: np.random.Generator) -> Programs:
    g = cfg.n_genes
    m, k = cfg.markers_per_type, cfg.genes_per_context_program
    n_prog = len(CONTEXT_PROGRAMS)
    n_range = {"short": cfg.short_range_genes, "long": cfg.long_range_genes}
    ranges = tuple(r for r, n in n_range.items() if n)
    n_hk = g - N_EXPRESSING * m - n_prog * k - sum(n_range.values())
    if n_hk < 0:
        raise UserError(f"config: expression.n_genes: {g} is fewer than the {g - n_hk} marker and context genes")
    names = [f"{p}{i + 1:02d}" for p in TYPE_PREFIX for i in range(m)]
    names += [f"{p[0]}{i + 1:02d}" for p in CONTEXT_PROGRAMS for i in range(k)]
    names += [f"{RANGE_PREFIX[r]}{i + 1:02d}" for r in ranges for i in range(n_range[r])]
    names += [f"HK{i + 1:03d}" for i in range(n_hk)]
    groups = (["marker"] * (N_EXPRESSING * m) + ["context_mix"] * (n_prog * k)
              + [f"context_{r}" for r in ranges for _ in range(n_range[r])] + ["housekeeping"] * n_hk)
    base = rng.normal(0.0, 1.0, g)
    base[: N_EXPRESSING * m] -= 1.5  # program genes are low outside their program
    base[N_EXPRESSING * m : N_EXPRESSING * m + n_prog * k] -= 0.5
    type_lfc = rng.normal(0.0, 0.3, (N_EXPRESSING, g))
    for t in range(N_EXPRESSING):
        type_lfc[t, t * m : (t + 1) * m] += rng.uniform(2.5, 4.5, m)
    logits = base + type_lfc
    profile = np.exp(logits - logits.max(axis=1, keepdims=True))
    profile /= profile.sum(axis=1, keepdims=True)
    context_lfc = np.zeros((n_prog, g))
    responds = np.zeros((len(TYPES), n_prog))
    drivers = np.zeros((len(TYPES), n_prog))
    start = N_EXPRESSING * m
    for p, (_, resp, drive, _, _) in enumerate(CONTEXT_PROGRAMS):
        context_lfc[p, start + p * k : start + (p + 1) * k] = rng.uniform(2.0, 3.5, k)
        for t in resp:
            responds[TYPES.index(t), p] = 1.0
        for t, w in drive.items():
            drivers[TYPES.index(t), p] = w
    ramp = np.array([[p[3] for p in CONTEXT_PROGRAMS], [p[4] for p in CONTEXT_PROGRAMS]])
    if ranges:  # drawn after everything above, so a config without range genes keeps its programs
        start += n_prog * k
        range_lfc = np.zeros((len(ranges), g))
        for r, name in enumerate(ranges):
            genes = slice(start, start + n_range[name])
            logits[:, genes] += RANGE_BASE
            range_lfc[r, genes] = rng.uniform(*cfg.range_lfc, n_range[name])
            start += n_range[name]
        profile = np.exp(logits - logits.max(axis=1, keepdims=True))
        profile /= profile.sum(axis=1, keepdims=True)
        context_lfc = np.vstack([context_lfc, range_lfc])
        every = np.zeros((len(TYPES), len(ranges)))
        every[:N_EXPRESSING] = 1.0
        responds = np.hstack([responds, every])
        drivers = np.hstack([drivers, np.zeros((len(TYPES), len(ranges)))])
        ramp = np.hstack([ramp, np.zeros((2, len(ranges)))])
    return Programs([f"SYNTH{i + 1:05d}" for i in range(g)], names, profile.astype(np.float32),
                    context_lfc.astype(np.float32), responds.astype(np.float32),
                    drivers.astype(np.float32), ramp.astype(np.float32), groups, ranges)


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0, 1)
    return x * x * (3 - 2 * x)


def range_activity(cfg: ExpressionConfig, name: str, fields: Fields, cells: Cells) -> np.ndarray:
    """(n_cells,) activity in [0, 1] of the range program ``name`` from the compartment fields."""
    res, label = fields.res_um, fields.label
    if name == "short":  # distance to the tumour-stroma interface, from either side
        tumour, stroma = label == 1, (label != GLASS) & (label != 1)
        dist = np.where(tumour, ndimage.distance_transform_edt(~stroma), ndimage.distance_transform_edt(~tumour)) * res
        near, far = cfg.short_range_um
        return smoothstep((far - sample_bilinear(dist, res, cells.x, cells.y)) / (far - near))
    sd = cfg.long_range_sd_um / res  # share of the tissue in immune aggregates around each cell
    inside = (label != GLASS).astype(np.float32)
    share = (ndimage.gaussian_filter((label == 2).astype(np.float32), sd, mode="constant", truncate=3.0)
             / np.maximum(ndimage.gaussian_filter(inside, sd, mode="constant", truncate=3.0), 1e-6))
    lo, hi = cfg.long_range_ramp
    return smoothstep((sample_bilinear(share, res, cells.x, cells.y) - lo) / (hi - lo))


def neighbourhood_fractions(cells: Cells, size_um: float, radius_um: float, res_um: float = 5.0) -> np.ndarray:
    """(n_cells, len(TYPES)) Gaussian-weighted (sd radius/2) share of each type around each cell."""
    n = int(np.ceil(size_um / res_um)) + 1
    i = np.clip((cells.y / res_um).astype(np.int64), 0, n - 1)
    j = np.clip((cells.x / res_um).astype(np.int64), 0, n - 1)
    flat = i * n + j
    dens = np.empty((len(TYPES), n, n), np.float32)
    for t in range(len(TYPES)):
        counts = np.bincount(flat[cells.type == t], minlength=n * n).reshape(n, n).astype(np.float32)
        dens[t] = ndimage.gaussian_filter(counts, radius_um / 2 / res_um, mode="constant", truncate=2.0)
    frac = dens / np.maximum(dens.sum(axis=0), 1e-6)
    return frac[:, i, j].T.copy()


@dataclasses.dataclass
class SlideExpression:
    """Per-slide quantities that fix every cell's expected counts."""

    programs: Programs
    cells: Cells
    activity: np.ndarray  # (n_cells, K) context activity (0 where the type does not respond)
    library: np.ndarray  # (n_cells,) expected UMIs before context
    batch: np.ndarray  # (G,) per-gene slide effect
    scatter_sd: np.ndarray  # (n_cells,) um
    context_by_type: np.ndarray | None = None  # (len(TYPES), G): the local oracle's context factor (local())

    def rates(self, sel: slice) -> np.ndarray:
        """(n, G) float32 Poisson means of the cells ``sel``."""
        t = self.cells.type[sel].astype(np.int64)
        t_expr = np.minimum(t, N_EXPRESSING - 1)
        if self.context_by_type is None:
            ctx = np.exp(self.activity[sel] @ self.programs.context_lfc)
        else:
            ctx = self.context_by_type[t]
        return (self.library[sel, None] * self.programs.profile[t_expr] * self.batch) * ctx

    def local(self) -> "SlideExpression":
        """The same slide with each cell's context factor replaced by its mean over the cells of its type."""
        total = np.zeros((len(TYPES), self.programs.context_lfc.shape[1]))
        for sel in self.chunks():
            np.add.at(total, self.cells.type[sel].astype(np.int64), np.exp(self.activity[sel] @ self.programs.context_lfc))
        n = np.bincount(self.cells.type.astype(np.int64), minlength=len(TYPES))
        mean = total / np.maximum(n, 1)[:, None]
        return dataclasses.replace(self, context_by_type=mean.astype(np.float32))

    def chunks(self) -> Iterator[slice]:
        for s in range(0, len(self.cells), CELL_CHUNK):
            yield slice(s, min(s + CELL_CHUNK, len(self.cells)))


def slide_expression(cfg: ExpressionConfig, programs: Programs, cells: Cells, fields: Fields, size_um: float,
                     rng: np.random.Generator) -> SlideExpression:
    frac = neighbourhood_fractions(cells, size_um, cfg.context_radius_um)
    t = cells.type.astype(np.int64)
    n_mix = len(CONTEXT_PROGRAMS)
    lo, hi = programs.ramp[:, :n_mix]
    activity = np.empty((len(cells), n_mix + len(programs.ranges)), np.float32)
    activity[:, :n_mix] = smoothstep((frac @ programs.drivers[:, :n_mix] - lo) / (hi - lo))
    for r, name in enumerate(programs.ranges):
        activity[:, n_mix + r] = range_activity(cfg, name, fields, cells)
    activity *= programs.responds[t]
    type_lib = np.append(TYPE_LIBRARY, 0.0)[t]  # red blood cells: no transcripts
    slide_lib = np.exp(rng.normal(0.0, cfg.slide_effect_sd))
    library = cfg.umis_per_cell * slide_lib * type_lib * cells.size**2
    batch = np.exp(rng.normal(0.0, cfg.gene_batch_sd, len(programs.gene_ids)))
    radius = MORPH["cyto_r"][t] * cells.size
    sd = np.sqrt((0.5 * radius) ** 2 + cfg.diffusion_um**2)
    return SlideExpression(programs, cells, activity.astype(np.float32), library.astype(np.float32),
                           batch.astype(np.float32), sd.astype(np.float32))


def sample_counts(expr: SlideExpression, grid: BinGrid, rng: np.random.Generator):
    """Counts in 2 um bins as sorted sparse triples (bin, gene, count); bin = row * n2 + col."""
    n_genes = len(expr.programs.gene_ids)
    keys = []
    for sel in expr.chunks():
        k = rng.poisson(expr.rates(sel))
        ci, gi = np.nonzero(k)
        reps = k[ci, gi]
        cell = np.repeat(ci, reps) + sel.start
        sd = expr.scatter_sd[cell]
        x = expr.cells.x[cell] + sd * rng.standard_normal(len(cell), dtype=np.float32)
        y = expr.cells.y[cell] + sd * rng.standard_normal(len(cell), dtype=np.float32)
        u, v = grid.to_grid(x, y)
        col, row = np.floor(u / 2).astype(np.int64), np.floor(v / 2).astype(np.int64)
        ok = (col >= 0) & (col < grid.n2) & (row >= 0) & (row < grid.n2)
        keys.append((row[ok] * grid.n2 + col[ok]) * n_genes + np.repeat(gi, reps)[ok])
    key, count = np.unique(np.concatenate(keys), return_counts=True)
    bins, genes = np.divmod(key, n_genes)
    return bins, genes.astype(np.int32), count.astype(np.int32)


def expected_counts(expr: SlideExpression, grid: BinGrid, bin_um: int, keep: np.ndarray) -> np.ndarray:
    """(keep.sum(), G) float32 Poisson means of the bins where ``keep`` (row-major flags) holds."""
    return expected_by_group(expr, grid, bin_um, np.where(keep, np.cumsum(keep) - 1, -1), int(keep.sum()))


def expected_by_group(expr: SlideExpression, grid: BinGrid, bin_um: int, group: np.ndarray,
                      n_groups: int) -> np.ndarray:
    """(n_groups, G) float32 Poisson means of the counts summed over the bins of each group; ``group``: each bin's
    group (row-major), -1 for none (e.g. the 2 um bins of each segmented cell)."""
    n = grid.n_side(bin_um)
    out = np.zeros((n_groups, len(expr.programs.gene_ids)), np.float32)
    for sel in expr.chunks():
        live = expr.library[sel] > 0
        if not live.any():
            continue
        cells = np.flatnonzero(live)
        sd = expr.scatter_sd[sel][cells].astype(np.float64)
        u, v = grid.to_grid(expr.cells.x[sel][cells].astype(np.float64), expr.cells.y[sel][cells].astype(np.float64))
        m = int(np.ceil(8 * sd.max() / bin_um)) + 1
        steps = np.arange(m)

        def weights(coord):
            first = np.floor((coord - 4 * sd) / bin_um).astype(np.int64)[:, None] + steps
            lo = (first * bin_um - coord[:, None]) / sd[:, None]
            return first, ndtr(lo + bin_um / sd[:, None]) - ndtr(lo)

        col, wx = weights(u)
        row, wy = weights(v)
        inside = (row[:, :, None] >= 0) & (row[:, :, None] < n) & (col[:, None, :] >= 0) & (col[:, None, :] < n)
        flat = np.where(inside, row[:, :, None] * n + col[:, None, :], 0)
        w = wy[:, :, None] * wx[:, None, :]
        target = np.where(inside, group[flat], -1)
        ok = (target >= 0) & (w > 1e-7)
        cell_idx = np.broadcast_to(np.arange(len(cells))[:, None, None], w.shape)[ok]
        rows, local = np.unique(target[ok], return_inverse=True)
        mat = sparse.csr_matrix((w[ok].astype(np.float32), (local, cell_idx)), shape=(len(rows), len(cells)))
        out[rows] += mat @ expr.rates(sel)[cells]
    return out

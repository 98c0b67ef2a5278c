"""One gene list per cohort, and the normalisation recorded in the manifest.

Genes are ranked on the TRAINING slides only (at ``genes.selection_bin_um``): by mean normalised
expression per bin (``top_mean``, the paper's top 250), by dispersion (``hvg``: variance / mean of
library-size-scaled counts, z-scored within 20 bins of mean, as Seurat's ``mean.var.plot``), or
taken from a user file (one gene name or id per line). The list keeps matrix order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet.errors import UserError

from .config import GeneConfig


def normalise(counts: np.ndarray, libsize: np.ndarray, cfg: GeneConfig) -> np.ndarray:
    """``counts`` (..., G) with ``libsize`` (...) broadcast over genes; zero library size gives zeros."""
    counts = np.asarray(counts, dtype=np.float64)
    if cfg.normalisation == "none":
        return counts
    if cfg.normalisation == "log1p":
        return np.log1p(counts)
    lib = np.asarray(libsize, dtype=np.float64)[..., None] if np.ndim(counts) > np.ndim(libsize) else libsize
    scale = np.divide(cfg.target_sum, lib, out=np.zeros(np.shape(lib)), where=np.asarray(lib) > 0)
    return np.log1p(counts * scale)


def normalisation_record(cfg: GeneConfig) -> dict:
    rec = {"method": cfg.normalisation, "library_size": "all genes of the bin / spot / tile"}
    if cfg.normalisation == "log1p_libsize":
        rec["target_sum"] = cfg.target_sum
    return rec


class GeneStats:
    """Per-gene sums over bins, accumulated block by block: of the normalised expression (``sum``,
    for top_mean) and of library-size-scaled counts and their squares (``lin_sum``, ``lin_sumsq``, for hvg)."""

    def __init__(self, n_genes: int, cfg: GeneConfig):
        self.cfg = cfg
        self.n_bins = 0
        self.sum, self.lin_sum, self.lin_sumsq = np.zeros(n_genes), np.zeros(n_genes), np.zeros(n_genes)

    def __call__(self, values: np.ndarray, gene: np.ndarray, libsize: np.ndarray) -> None:
        n = len(self.sum)
        self.sum += np.bincount(gene, weights=normalise(values, libsize, self.cfg), minlength=n)
        lin = values * np.divide(self.cfg.target_sum, libsize, out=np.zeros(len(libsize)), where=libsize > 0)
        self.lin_sum += np.bincount(gene, weights=lin, minlength=n)
        self.lin_sumsq += np.bincount(gene, weights=lin * lin, minlength=n)

    def merge(self, other: "GeneStats") -> None:
        self.n_bins += other.n_bins
        self.sum += other.sum
        self.lin_sum += other.lin_sum
        self.lin_sumsq += other.lin_sumsq


def _dispersion_rank(stats: GeneStats) -> np.ndarray:
    """Seurat-style: log(var / mean) of library-size-scaled counts, z-scored within 20 bins of log mean."""
    n = max(stats.n_bins, 1)
    lin_mean = stats.lin_sum / n
    var = np.maximum(stats.lin_sumsq / n - lin_mean**2, 0) * n / max(n - 1, 1)
    disp = np.log(np.divide(var, lin_mean, out=np.zeros_like(var), where=lin_mean > 0) + 1e-12)
    mean = np.log1p(lin_mean)
    edges = np.quantile(mean, np.linspace(0, 1, 21))
    group = np.clip(np.searchsorted(edges, mean, side="right") - 1, 0, 19)
    z = np.zeros_like(disp)
    for g in np.unique(group):
        m = group == g
        sd = disp[m].std()
        z[m] = (disp[m] - disp[m].mean()) / sd if sd > 0 else 0.0
    z[mean <= 0] = -np.inf
    return z


def select_genes(ids: list[str], names: list[str], stats: GeneStats, cfg: GeneConfig) -> np.ndarray:
    """Indices (matrix order) of the cohort's genes."""
    if cfg.selection == "file":
        return genes_from_file(Path(cfg.gene_file), ids, names)
    if cfg.n_genes > len(ids):
        raise UserError(f"config: genes.n_genes: {cfg.n_genes} is more than the {len(ids)} genes in the matrices")
    score = stats.sum if cfg.selection == "top_mean" else _dispersion_rank(stats)
    order = np.lexsort((np.arange(len(score)), -score))  # ties broken by matrix order: deterministic
    return np.sort(order[: cfg.n_genes])


def genes_from_file(path: Path, ids: list[str], names: list[str]) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: genes.gene_file: file not found")
    wanted = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not wanted:
        raise UserError(f"{path}: genes.gene_file: no gene listed")
    by_id = {g: i for i, g in enumerate(ids)}
    by_name: dict[str, int] = {}
    for i, g in enumerate(names):
        by_name.setdefault(g, i)
    missing = [g for g in wanted if g not in by_id and g not in by_name]
    if missing:
        raise UserError(f"{path}: gene: {len(missing)} genes not in the matrix, e.g. '{missing[0]}'")
    index = [by_id[g] if g in by_id else by_name[g] for g in wanted]
    if len(set(index)) != len(index):
        raise UserError(f"{path}: gene: a gene is listed twice")
    return np.asarray(index, dtype=np.int64)

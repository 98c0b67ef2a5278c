"""What predictions are compared with, normalised exactly like the training targets
(:func:`sharding.genes.normalise`, library size over all genes of the bin or spot cell):

- measured: the slide's counts (Space Ranger matrix) of the evaluated genes;
- oracle: from a synthetic slide's Poisson means (``<slide>/ground_truth/expected_{bin:03d}um.h5``),
  the expected normalised target ``E[normalise(counts)]`` with counts ~ Poisson(means), estimated by
  seeded Monte Carlo: the best prediction in mean squared error given the true means, so the ceiling of
  the table. (The means normalised directly are not: by Jensen's inequality ``log1p(E[c]) > E[log1p(c)]``,
  and at the low counts of 8 and 16 um bins a trained model beats them.)
- spot level: counts (or means) summed over the bins of each spot cell, then normalised, as the
  shards' ``spot_expr``; a model without a spot head is pooled from its bin predictions.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from sharding.config import GeneConfig
from sharding.genes import normalise

ALL = "all"  # the built-in group of every evaluated gene: no group of a file may take its name


def expected_file(spaceranger: Path, bin_um: int) -> Path:
    """Where the synthetic generator puts the ground truth: beside the slide's ``outs`` folder."""
    return spaceranger.parent / "ground_truth" / f"expected_{bin_um:03d}um.h5"


def local_expected_file(spaceranger: Path, bin_um: int) -> Path:
    """The synthetic slide's local oracle means: each cell's context replaced by its expectation given its type."""
    return spaceranger.parent / "ground_truth" / f"local_expected_{bin_um:03d}um.h5"


def expected_cells_file(spaceranger: Path) -> Path:
    """The synthetic slide's Poisson means per segmented cell (rows: the cell ids of its segmentation)."""
    return spaceranger.parent / "ground_truth" / "expected_cells.h5"


def gene_groups_file(spaceranger: Path) -> Path:
    """The synthetic slide's gene groups (CSV ``gene,group``)."""
    return spaceranger.parent / "ground_truth" / "gene_groups.csv"


def read_gene_groups(path: Path, genes: list[str]) -> dict[str, str]:
    """``gene -> group`` for ``genes`` from a CSV with header ``gene,group``; a gene the file does not list
    is in group ``other``. A bad file is a one-line error naming the field."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for field in ("gene", "group"):
                if field not in header:
                    raise UserError(f"{path}: {field}: column missing (header: {','.join(header) or 'none'}; "
                                    f"expected gene,group)")
            table: dict[str, str] = {}
            for line, rec in enumerate(reader, 2):
                gene, group = (rec.get("gene") or "").strip(), (rec.get("group") or "").strip()
                for field, value in (("gene", gene), ("group", group)):
                    if not value:
                        raise UserError(f"{path}: {field}: empty on line {line}")
                if group.lower() == ALL:
                    raise UserError(f"{path}: group: '{group}' on line {line} is the name of the built-in group of "
                                    f"every gene; rename it")
                if gene in table and table[gene] != group:
                    raise UserError(f"{path}: gene: '{gene}' is in two groups ('{table[gene]}', '{group}')")
                table[gene] = group
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: gene: cannot read the file ({e})") from None
    if not any(g in table for g in genes):
        raise UserError(f"{path}: gene: none of the {len(genes)} evaluated genes is listed (e.g. '{genes[0]}')")
    return {g: table.get(g, "other") for g in genes}


def read_expected(path: Path, barcodes: np.ndarray, genes: list[str]) -> tuple[np.ndarray, list[int]]:
    """(means of all genes (n, G_all) for ``barcodes``, in that order; columns of ``genes`` among them)."""
    import h5py  # start-up time: the CLI imports this module

    with h5py.File(path, "r") as f:
        names = [g.decode() for g in f["genes"][:]]
        rows = {b.decode(): i for i, b in enumerate(f["barcodes"][:])}
        expected = f["expected"][:].astype(np.float64)
    index = [rows.get(b, -1) for b in barcodes]
    if min(index, default=0) < 0:
        missing = barcodes[index.index(-1)]
        raise UserError(f"{path}: barcodes: bin '{missing}' of the Space Ranger matrix is missing")
    col = {g: i for i, g in enumerate(names)}
    absent = [g for g in genes if g not in col]
    if absent:
        raise UserError(f"{path}: genes: '{absent[0]}' is missing")
    return expected[index], [col[g] for g in genes]


def oracle(means: np.ndarray, cols: list[int], gcfg: GeneConfig, draws: int, seed: int) -> np.ndarray:
    """Monte Carlo ``E[normalise(c)[:, cols]]``, ``c ~ Poisson(means)`` (library size over all genes of each draw)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((len(means), len(cols)))
    for _ in range(draws):
        c = rng.poisson(means).astype(np.float64)
        out += normalise(c[:, cols], c.sum(1), gcfg)
    return out / draws


def spot_cells(bin_spot: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cell ids holding at least one bin, index of each bin's cell among them)."""
    return np.unique(bin_spot, return_inverse=True)


def sum_by(values: np.ndarray, inverse: np.ndarray, n: int) -> np.ndarray:
    """Rows of ``values`` summed by group (``inverse`` from :func:`spot_cells`)."""
    out = np.zeros((n,) + values.shape[1:])
    np.add.at(out, inverse, values)
    return out


def pool_bins(pred: np.ndarray, inverse: np.ndarray, n: int, gcfg: GeneConfig,
              extra: dict | None = None) -> np.ndarray:
    """Spot-cell expression from bin predictions of a model without a spot head: back to (library-scaled)
    counts, combined as the normalisation combines counts, normalised again (equal library sizes assumed). A
    count model's bins pool their rates (``extra['rate']``, :func:`magnet.predict.slide.predict_slide`), weighted
    by each bin's predicted library size where the model predicts one (``extra['libsize']``): the normalised value
    of the cell's expected counts."""
    if extra and "rate" in extra:  # count models need log1p_libsize
        weight = extra.get("libsize", np.ones(len(pred))).astype(np.float64)
        lin = sum_by(extra["rate"].astype(np.float64) * weight[:, None], inverse, n)
        total = sum_by(weight, inverse, n)[:, None]
        return np.log1p(np.divide(lin, total, out=np.zeros_like(lin), where=total > 0) * gcfg.target_sum)
    if gcfg.normalisation == "none":
        return sum_by(pred, inverse, n)
    lin = sum_by(np.expm1(pred.astype(np.float64)), inverse, n)
    if gcfg.normalisation == "log1p_libsize":
        lin /= np.bincount(inverse, minlength=n)[:, None]
    return np.log1p(lin)

"""Per gene group, over replicates, and paired: what ``magnet evaluate`` says about one model against another.

All of it is built on the PCC per gene of the bin-level rows (bin head; oracles: expected target), per
slide, ``pcc[r, s, g]`` for replicate ``r`` (``LABEL#r``; one without replicates), slide ``s``, gene ``g``:

- per gene group (``gene_groups.csv`` of the ground truth, or ``--gene-groups``; plus ``all``): the mean of
  ``pcc`` over the group's genes and the slides, per replicate; reported as the mean over replicates, with
  the sd over replicates (more than one) and the sd over slides (of the replicates' mean);
- paired comparison of A and B (same slides, same genes, same bins): ``d[s, g]`` = mean over A's replicates
  minus mean over B's; per gene ``d_g`` = mean of ``d`` over slides. Per group: ``delta`` = mean of ``d_g``
  over the group's genes; ``p`` = two-sided Wilcoxon signed-rank test of the ``d_g`` against 0
  (:func:`scipy.stats.wilcoxon`); a 95% percentile bootstrap interval of ``delta`` from ``n`` resamples drawn
  by ``numpy.random.default_rng(seed)`` (a fresh generator per pair and group): over slides when there are
  at least 3 (``rng.integers(0, S, (n, S))``, the mean of ``d`` over the drawn slides and the group's genes),
  else over genes (``rng.integers(0, G_group, (n, G_group))`` on the ``d_g``; none for a group of fewer than 5
  genes). The verdict: ``A better`` or ``B better`` where the interval excludes 0, ``tie`` where it holds 0,
  ``too few to tell`` without an interval. The replicate spread is not in the interval; it
  is reported beside (mean ± sd over replicates).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from magnet.evaluate.select import replicate_of
from magnet.evaluate.truth import ALL
from magnet.io import atomic_write_bytes

MIN_SLIDES_FOR_SLIDE_BOOTSTRAP = 3
MIN_GENES_FOR_GENE_BOOTSTRAP = 5  # fewer (and fewer than 3 slides): no interval, the verdict "too few to tell"


@dataclasses.dataclass
class GenePcc:
    """One model (its replicates stacked) at one bin size: ``pcc`` (R, S, G) on ``slides``."""

    name: str
    bin_um: int
    pcc: np.ndarray
    slides: list[str]


def gene_pccs(rows: list[dict]) -> dict[tuple[int, str], GenePcc]:
    """The bin-level rows' PCC per gene, replicates of one label stacked: ``{(bin_um, name): GenePcc}``."""
    out: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r["level"] == "bins":
            out.setdefault((r["bin_um"], replicate_of(r["model"])), []).append(r)
    pccs = {}
    for (bin_um, name), reps in out.items():
        slides = sorted(reps[0]["gene_pcc"])
        if any(sorted(r["gene_pcc"]) != slides for r in reps):
            raise RuntimeError(f"replicates of {name} were scored on different slides")
        pccs[(bin_um, name)] = GenePcc(name, bin_um, np.stack([[r["gene_pcc"][s] for s in slides] for r in reps]),
                                       slides)
    return pccs


def group_index(genes: list[str], groups: dict[str, str] | None) -> dict[str, np.ndarray]:
    """``{group: gene columns}``, groups in order of first appearance, then ``all``."""
    out: dict[str, list[int]] = {}
    for i, g in enumerate(genes):
        if groups is not None:
            out.setdefault(groups[g], []).append(i)
    return {**{k: np.array(v) for k, v in out.items()}, ALL: np.arange(len(genes))}


def group_rows(pccs: dict[tuple[int, str], GenePcc], index: dict[str, np.ndarray]) -> list[dict]:
    """Per model and group: mean PCC per gene, sd over replicates and over slides."""
    rows = []
    for (bin_um, name), m in pccs.items():
        for group, cols in index.items():
            per_slide = m.pcc[:, :, cols].mean(2)  # (R, S)
            per_rep = per_slide.mean(1)
            rows.append({"bin_um": bin_um, "model": name, "group": group, "n_genes": len(cols),
                         "n_replicates": len(per_rep), "n_slides": len(m.slides), "pcc_gene": float(per_rep.mean()),
                         "sd_replicates": float(per_rep.std(ddof=1)) if len(per_rep) > 1 else float("nan"),
                         "sd_slides": float(per_slide.mean(0).std(ddof=1)) if len(m.slides) > 1 else float("nan")})
    return rows


def pairs_to_compare(pccs: dict[tuple[int, str], GenePcc], controls: list[str],
                     chosen: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """``chosen`` (``--compare``), else the first model against every other one of its bin size (oracles
    aside); then every model against each of its context controls."""
    from magnet.evaluate.table import CONTROL_NAMES, LOCAL_ORACLE, ORACLE  # start-up time: the CLI imports this module

    pairs = list(chosen or [])
    names_by_bin: dict[int, list[str]] = {}
    for bin_um, name in pccs:
        names_by_bin.setdefault(bin_um, []).append(name)
    for names in names_by_bin.values():
        plain = [n for n in names if n not in (ORACLE, LOCAL_ORACLE) and not n.endswith(")")]
        if chosen is None:
            pairs += [(plain[0], other) for other in plain[1:]]
        for n in plain:
            pairs += [(n, f"{n} ({CONTROL_NAMES[c]})") for c in controls if f"{n} ({CONTROL_NAMES[c]})" in names]
    return list(dict.fromkeys(pairs))


def parse_pairs(specs: list[str], pccs: dict[tuple[int, str], GenePcc]) -> list[tuple[str, str]]:
    """``A:B`` (labels of the table: a model, ``LABEL (context shuffled)``, ``oracle``...)."""
    names = {name for _, name in pccs}
    out = []
    for spec in specs:
        a, sep, b = spec.partition(":")
        if not sep or not a or not b:
            raise UserError(f"{spec}: --compare: expected A:B (two labels of the table)")
        for x in (a, b):
            if x not in names:
                raise UserError(f"{spec}: --compare: '{x}' is no model of the table (known: {', '.join(sorted(names))})")
        out.append((a, b))
    return out


def compare(a: GenePcc, b: GenePcc, index: dict[str, np.ndarray], seed: int, n_boot: int) -> list[dict]:
    """The paired statistics of A minus B per group (module docstring)."""
    from scipy.stats import wilcoxon  # start-up time: the CLI imports this module

    if a.slides != b.slides or a.pcc.shape[2] != b.pcc.shape[2]:
        raise UserError(f"--compare: '{a.name}' and '{b.name}' were not scored on the same slides and genes")
    d = a.pcc.mean(0) - b.pcc.mean(0)  # (S, G)
    d_gene = d.mean(0)
    S = d.shape[0]
    over = "slides" if S >= MIN_SLIDES_FOR_SLIDE_BOOTSTRAP else "genes"
    rows = []
    for group, cols in index.items():
        rng = np.random.default_rng(seed)
        draws = None
        if over == "slides":
            draws = d[rng.integers(0, S, (n_boot, S))][:, :, cols].mean((1, 2))
        elif len(cols) >= MIN_GENES_FOR_GENE_BOOTSTRAP:
            draws = d_gene[cols][rng.integers(0, len(cols), (n_boot, len(cols)))].mean(1)
        lo, hi = (float(v) for v in np.percentile(draws, [2.5, 97.5])) if draws is not None else (math.nan,) * 2
        dg = d_gene[cols]
        p = float(wilcoxon(dg).pvalue) if np.any(dg != 0) else 1.0
        verdict = (f"{a.name} better" if lo > 0 else f"{b.name} better" if hi < 0 else
                   "tie" if lo <= 0 <= hi else "too few to tell")
        rows.append({"bin_um": a.bin_um, "a": a.name, "b": b.name, "group": group, "n_genes": len(cols),
                     "n_slides": S, "n_replicates_a": a.pcc.shape[0], "n_replicates_b": b.pcc.shape[0],
                     "pcc_a": float(a.pcc.mean(0)[:, cols].mean()), "pcc_b": float(b.pcc.mean(0)[:, cols].mean()),
                     "delta": float(dg.mean()), "ci_low": lo, "ci_high": hi, "bootstrap_over": over,
                     "wilcoxon_p": p, "verdict": verdict})
    return rows


def slug(text: str) -> str:
    """A file-name (and MLflow key) part: runs of other characters than ``A-Za-z0-9_.-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def mlflow_key(text: str) -> str:
    """An MLflow param or metric name: characters MLflow refuses (``#``, parentheses...) become ``_``."""
    return re.sub(r"[^A-Za-z0-9_./: -]", "_", text)


def scatter(a: GenePcc, b: GenePcc, genes: list[str], groups: dict[str, str] | None, path: Path) -> Path:
    """PNG: per-gene PCC of A (x) against B (y), means over slides and replicates, coloured by group."""
    import matplotlib  # here, not at import: use("Agg") must not switch the backend of a program importing us

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    x, y = a.pcc.mean((0, 1)), b.pcc.mean((0, 1))
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    labels = [groups[g] for g in genes] if groups is not None else [ALL] * len(genes)
    for group in dict.fromkeys(labels):
        keep = np.array([lab == group for lab in labels])
        ax.scatter(x[keep], y[keep], s=12, alpha=0.8, label=f"{group} ({keep.sum()})")
    lo, hi = float(min(x.min(), y.min(), 0)), float(max(x.max(), y.max(), 0.1))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel(f"PCC per gene: {a.name}")
    ax.set_ylabel(f"PCC per gene: {b.name}")
    ax.set_title(f"{a.bin_um} um bins, {len(a.slides)} slide(s)")
    ax.legend(fontsize=7, loc="upper left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def genes_csv(pccs: dict[tuple[int, str], GenePcc], genes: list[str], groups: dict[str, str] | None) -> str:
    """CSV: bin_um, model, gene, group, PCC per gene (mean over slides and replicates), sd over replicates."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["bin_um", "model", "gene", "group", "pcc", "pcc_sd_replicates", "n_replicates"])
    for (bin_um, name), m in pccs.items():
        per_rep = m.pcc.mean(1)  # (R, G)
        sd = per_rep.std(0, ddof=1) if len(per_rep) > 1 else np.full(len(genes), np.nan)
        for g, gene in enumerate(genes):
            w.writerow([bin_um, name, gene, groups[gene] if groups else ALL, f"{per_rep[:, g].mean():.6g}",
                        "" if not np.isfinite(sd[g]) else f"{sd[g]:.6g}", len(per_rep)])
    return buf.getvalue()

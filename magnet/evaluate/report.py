"""The evaluation table as Markdown and CSV (summary and per slide), written atomically, and logged to MLflow.

Rows of a cross-validated model (one model per fold) also carry mean ± sd over folds: a second Markdown
table, ``n_folds`` and ``{metric}_fold_mean`` / ``{metric}_fold_sd`` CSV columns, and MLflow metrics
suffixed ``_fold_mean`` / ``_fold_sd``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from magnet.evaluate.paired import slug
from magnet.evaluate.select import REPLICATE, replicate_of
from magnet.evaluate.table import CELL_VS_EXPECTED, FINE_POOLED, SPOT_HEAD
from magnet.io import atomic_write_text
from magnet.metrics import METRICS
from magnet.registry.tracking import Tracker
from magnet.train_config import MlflowConfig

HEADERS = {"mse": "MSE", "mae": "MAE", "pcc_bin": "PCC per bin", "pcc_gene": "PCC per gene",
           "pcc_gene_topk": "PCC per gene (top {k})"}


def _level(row: dict) -> str:
    if row["level"] == "bins":
        return f"{row['bin_um']} um bins"
    return f"{row['level']} ({row['bin_um']} um model)"


def _table(heads: list[str], aligns: str, rows: list[list]) -> str:
    """A Markdown table: ``aligns`` has one letter per column, ``l`` (left) or ``r`` (right)."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in aligns)
    return "\n".join(["| " + " | ".join(heads) + " |", rule, *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def markdown(rows: list[dict], top_k: int, notes: list[str]) -> str:
    heads = [HEADERS[m].format(k=top_k) for m in METRICS]
    text = _table(["level", "model", "scored", "slides", *heads], "lllr" + "r" * len(METRICS),
                  [[_level(r), r["model"], r["source"], r["n_slides"],
                    *(f"{r[m]:.3f}" + (f" ± {r[f'{m}_sd']:.3f}" if r["n_slides"] > 1 else "") for m in METRICS)]
                   for r in rows])
    legend = (f"Mean ± sd over slides (sd shown with more than one slide). PCC per bin: across genes, mean over "
              f"bins (MagNet paper); PCC per gene: across bins, mean over genes (HEST); top {top_k}: the most "
              f"variable measured genes of these slides. Targets: the training normalisation.")
    return "\n\n".join(["# Evaluation", text, legend, *_folds_markdown(rows, heads), *notes]) + "\n"


def _folds_markdown(rows: list[dict], heads: list[str]) -> list[str]:
    """The cross-validated rows as mean ± sd over folds (none: no section)."""
    folded = [r for r in rows if r["n_folds"]]
    if not folded:
        return []
    table = _table(["level", "model", "scored", "folds", "slides", *heads], "lllrr" + "r" * len(METRICS),
                   [[_level(r), r["model"], r["source"], r["n_folds"], r["n_slides"],
                     *(f"{r[f'{m}_fold_mean']:.3f}" + (f" ± {r[f'{m}_fold_sd']:.3f}" if r["n_folds"] > 1 else "")
                       for m in METRICS)] for r in folded])
    legend = ("Cross-validation: mean ± sd over folds, a fold's value being the mean over its held-out slides, "
              "each scored by the model that did not train on it.")
    return ["## Over folds", table, legend]


def _csv(header: list[str], records: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(records)
    return buf.getvalue()


def _cell(r: dict, h: str):
    """A summary value; sds need more than one slide (fold), fold columns a row with folds."""
    if h.endswith("_fold_sd"):
        return r[h] if r["n_folds"] > 1 else ""
    if h.endswith("_fold_mean"):
        return r[h] if r["n_folds"] else ""
    if h.endswith("_sd"):
        return r[h] if r["n_slides"] > 1 else ""
    return r[h]


def summary_csv(rows: list[dict]) -> str:
    header = (["level", "bin_um", "model", "source", "uri", "n_slides"] + [c for m in METRICS for c in (m, f"{m}_sd")]
              + ["n_folds"] + [c for m in METRICS for c in (f"{m}_fold_mean", f"{m}_fold_sd")])
    return _csv(header, [[_cell(r, h) for h in header] for r in rows])


def slides_csv(rows: list[dict]) -> str:
    header = ["level", "bin_um", "model", "slide", "split", "fold", "n"] + list(METRICS)
    return _csv(header, [[r["level"], r["bin_um"], r["model"], s, v["split"], "" if v["fold"] is None else v["fold"],
                          v["n"], *(v[m] for m in METRICS)] for r in rows for s, v in r["slides"].items()])


def over_replicates(rows: list[dict]) -> list[dict]:
    """Rows of replicated models (``LABEL#k``) as mean and sample sd over replicates of each metric (a
    replicate's value: its mean over slides), one per (level, bin size, source, label)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if REPLICATE in r["model"]:
            groups.setdefault((r["level"], r["bin_um"], replicate_of(r["model"]), r["source"]), []).append(r)
    out = []
    for (level, bin_um, model, source), reps in groups.items():
        row = {"level": level, "bin_um": bin_um, "model": model, "source": source, "n_replicates": len(reps)}
        for m in METRICS:
            v = np.array([r[m] for r in reps])
            row[m], row[f"{m}_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out.append(row)
    return out


def _fmt(v: float) -> str:
    return "" if not math.isfinite(v) else f"{v:.3f}"


def _interval(r: dict) -> str:
    if not math.isfinite(r["ci_low"]):
        return "-"
    return f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"


def analysis_markdown(replicates: list[dict], groups: list[dict], paired: list[dict], top_k: int) -> list[str]:
    """Sections over replicates, per gene group and of the paired comparisons (none: no section)."""
    parts = []
    if replicates:
        heads = [HEADERS[m].format(k=top_k) for m in METRICS]
        table = _table(["level", "model", "scored", "replicates", *heads], "lllr" + "r" * len(METRICS),
                       [[_level(r), r["model"], r["source"], r["n_replicates"],
                         *(f"{r[m]:.3f} ± {r[f'{m}_sd']:.3f}" for m in METRICS)] for r in replicates])
        parts += ["## Over replicates", table,
                  "Mean ± sd over replicates (models trained alike but for the seed), a replicate's value being "
                  "its mean over slides."]
    if groups:
        table = _table(["bin", "model", "group", "genes", "replicates", "PCC per gene", "sd over replicates",
                        "sd over slides"], "rllrrrrr",
                       [[f"{r['bin_um']} um", r["model"], r["group"], r["n_genes"], r["n_replicates"],
                         f"{r['pcc_gene']:.3f}", _fmt(r["sd_replicates"]), _fmt(r["sd_slides"])] for r in groups])
        parts += ["## Per gene group", table,
                  "PCC per gene (across the bins of a slide) averaged over the group's genes and the slides; bin "
                  "level. The oracle minus the local oracle of a group is the gain context can bring there."]
    if paired:
        table = _table(["bin", "A", "B", "group", "genes", "PCC A", "PCC B", "A - B", "95% interval", "resampled",
                        "Wilcoxon p", "verdict"], "rlllrrrrllrl",
                       [[f"{r['bin_um']} um", r["a"], r["b"], r["group"], r["n_genes"], f"{r['pcc_a']:.3f}",
                         f"{r['pcc_b']:.3f}", f"{r['delta']:+.4f}", _interval(r), r["bootstrap_over"],
                         f"{r['wilcoxon_p']:.2g}", r["verdict"]] for r in paired])
        parts += ["## Paired comparisons", table,
                  "A - B: the mean over the group's genes of the per-gene PCC difference (means over replicates and "
                  "slides). Interval: 95% percentile bootstrap, resampling slides (3 or more) or else genes; "
                  "Wilcoxon: two-sided signed-rank test of the per-gene differences. An interval holding 0 is a tie. "
                  "Context controls (magnet/predict/context.py): 'context zeroed' sets every frozen spot and global "
                  "feature to 0, the slide's mean; 'context shuffled' gives each tile the features of another tile "
                  "of the slide (a seeded permutation)."]
    return parts


def write(out: Path, rows: list[dict], top_k: int, notes: list[str], groups: list[dict] = (),
          paired: list[dict] = (), genes_csv: str = "") -> dict[str, Path]:
    """The tables; the analysis files only where there is an analysis."""
    replicates = over_replicates(rows)
    md = markdown(rows, top_k, notes)
    extra = analysis_markdown(replicates, list(groups), list(paired), top_k)
    if extra:
        md = md.rstrip("\n") + "\n\n" + "\n\n".join(extra) + "\n"
    texts = {"markdown": md, "csv": summary_csv(rows), "slides_csv": slides_csv(rows)}
    if replicates:
        texts["replicates_csv"] = _records_csv(replicates)
    if groups:
        texts["groups_csv"] = _records_csv(list(groups))
    if paired:
        texts["paired_csv"] = _records_csv(list(paired))
    if genes_csv:
        texts["genes_csv"] = genes_csv
    names = {"markdown": "evaluation.md", "csv": "evaluation.csv", "slides_csv": "evaluation_slides.csv",
             "replicates_csv": "evaluation_replicates.csv", "groups_csv": "evaluation_groups.csv",
             "paired_csv": "evaluation_paired.csv", "genes_csv": "evaluation_genes.csv"}
    paths = {k: out / names[k] for k in texts}
    for k, p in paths.items():
        atomic_write_text(p, texts[k])
    return paths


def _records_csv(records: list[dict]) -> str:
    header = list(records[0])
    return _csv(header, [["" if isinstance(r[h], float) and not math.isfinite(r[h]) else r[h] for h in header]
                         for r in records])


def metric_name(row: dict, metric: str) -> str:
    """MLflow metric key, e.g. ``magnet/16um/pcc_gene``, ``oracle/spot16um/pcc_gene``, ``magnet/spot16um_head/mse``."""
    level = f"{row['bin_um']}um" if row["level"] == "bins" else f"{row['level']}{row['bin_um']}um"
    level += "_head" if row["source"] == SPOT_HEAD else ""
    level += "_pooled" if row["source"] == FINE_POOLED else ""
    level += "_vs_expected" if row["source"] == CELL_VS_EXPECTED else ""
    return f"{slug(row['model'])}/{level}/{metric}"


def analysis_metrics(groups: list[dict], paired: list[dict]) -> dict[str, float]:
    """MLflow keys: ``{model}/{bin}um/group/{group}/pcc_gene`` (and ``_sd`` over replicates), and per pair
    ``paired/{A}_vs_{B}/{bin}um/{group}/`` ``delta``, ``ci_low``, ``ci_high``, ``wilcoxon_p``."""
    out = {}
    for r in groups:
        key = f"{slug(r['model'])}/{r['bin_um']}um/group/{slug(r['group'])}/pcc_gene"
        out[key] = r["pcc_gene"]
        out[key + "_sd"] = r["sd_replicates"]
    for r in paired:
        key = f"paired/{slug(r['a'])}_vs_{slug(r['b'])}/{r['bin_um']}um/{slug(r['group'])}"
        out.update({f"{key}/{m}": r[m] for m in ("delta", "ci_low", "ci_high", "wilcoxon_p")})
    return out


def log_mlflow(tracking_uri: str, experiment: str, run_name: str, rows: list[dict], paths: dict[str, Path],
               params: dict, extra_metrics: dict[str, float] | None = None, run_id: str = "") -> str:
    """One MLflow run (with ``run_id``: that existing run, its params untouched) holding the metrics (means;
    sds as ``..._sd``; over folds ``..._fold_mean`` and ``..._fold_sd``; ``extra_metrics``) and the files
    (artifact folder ``evaluation``); returns its id."""
    tracker = Tracker(MlflowConfig(tracking_uri=tracking_uri, experiment=experiment), active=True)
    run_id = tracker.start(run_name, params, tags={"magnet.evaluation": "true"} if run_id else
                           {"magnet.kind": "evaluation"}, run_id=run_id or None)
    try:
        metrics = {}
        for r in rows:
            for m in METRICS:
                metrics[metric_name(r, m)] = r[m]
                if r["n_slides"] > 1:
                    metrics[metric_name(r, m) + "_sd"] = r[f"{m}_sd"]
                if r["n_folds"]:
                    metrics[metric_name(r, m) + "_fold_mean"] = r[f"{m}_fold_mean"]
                if r["n_folds"] > 1:
                    metrics[metric_name(r, m) + "_fold_sd"] = r[f"{m}_fold_sd"]
        metrics.update(extra_metrics or {})
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
        for p in paths.values():
            tracker.log_artifact(p, "evaluation")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return run_id

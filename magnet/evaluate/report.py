"""The evaluation table as Markdown and CSV (summary and per slide), written atomically, and logged to MLflow.

Rows of a cross-validated model (one model per fold) also carry mean ± sd over folds: a second Markdown
table, ``n_folds`` and ``{metric}_fold_mean`` / ``{metric}_fold_sd`` CSV columns, and MLflow metrics
suffixed ``_fold_mean`` / ``_fold_sd``."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from magnet.evaluate.table import SPOT_HEAD
from magnet.io import atomic_write_text
from magnet.metrics import METRICS

HEADERS = {"mse": "MSE", "mae": "MAE", "pcc_bin": "PCC per bin", "pcc_gene": "PCC per gene",
           "pcc_gene_topk": "PCC per gene (top {k})"}


def _level(row: dict) -> str:
    return f"{row['bin_um']} um bins" if row["level"] == "bins" else f"spot ({row['bin_um']} um model)"


def markdown(rows: list[dict], top_k: int, notes: list[str]) -> str:
    heads = [HEADERS[m].format(k=top_k) for m in METRICS]
    lines = ["| level | model | scored | slides | " + " | ".join(heads) + " |",
             "|---|---|---|---:|" + "---:|" * len(METRICS)]
    for r in rows:
        cells = []
        for m in METRICS:
            sd = f" ± {r[f'{m}_sd']:.3f}" if r["n_slides"] > 1 else ""
            cells.append(f"{r[m]:.3f}{sd}")
        lines.append(f"| {_level(r)} | {r['model']} | {r['source']} | {r['n_slides']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    legend = (f"Mean ± sd over slides (sd shown with more than one slide). PCC per bin: across genes, mean over "
              f"bins (MagNet paper); PCC per gene: across bins, mean over genes (HEST); top {top_k}: the most "
              f"variable measured genes of these slides. Targets: the training normalisation.")
    return "\n\n".join(["# Evaluation", text, legend, *_folds_markdown(rows, heads), *notes]) + "\n"


def _folds_markdown(rows: list[dict], heads: list[str]) -> list[str]:
    """The cross-validated rows as mean ± sd over folds (none: no section)."""
    folded = [r for r in rows if r["n_folds"]]
    if not folded:
        return []
    lines = ["| level | model | scored | folds | slides | " + " | ".join(heads) + " |",
             "|---|---|---|---:|---:|" + "---:|" * len(METRICS)]
    for r in folded:
        cells = [f"{r[f'{m}_fold_mean']:.3f}" + (f" ± {r[f'{m}_fold_sd']:.3f}" if r["n_folds"] > 1 else "")
                 for m in METRICS]
        lines.append(f"| {_level(r)} | {r['model']} | {r['source']} | {r['n_folds']} | {r['n_slides']} | "
                     + " | ".join(cells) + " |")
    legend = ("Cross-validation: mean ± sd over folds, a fold's value being the mean over its held-out slides, "
              "each scored by the model that did not train on it.")
    return ["## Over folds", "\n".join(lines), legend]


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


def write(out: Path, rows: list[dict], top_k: int, notes: list[str]) -> dict[str, Path]:
    paths = {"markdown": out / "evaluation.md", "csv": out / "evaluation.csv", "slides_csv": out / "evaluation_slides.csv"}
    texts = {"markdown": markdown(rows, top_k, notes), "csv": summary_csv(rows), "slides_csv": slides_csv(rows)}
    for k, p in paths.items():
        atomic_write_text(p, texts[k])
    return paths


def metric_name(row: dict, metric: str) -> str:
    """MLflow metric key, e.g. ``magnet/16um/pcc_gene``, ``oracle/spot16um/pcc_gene``, ``magnet/spot16um_head/mse``."""
    level = f"{row['bin_um']}um" if row["level"] == "bins" else f"spot{row['bin_um']}um"
    level += "_head" if row["source"] == SPOT_HEAD else ""
    return f"{row['model']}/{level}/{metric}"


def log_mlflow(tracking_uri: str, experiment: str, run_name: str, rows: list[dict], paths: dict[str, Path],
               params: dict) -> str:
    """One MLflow run holding the metrics (means; sds as ``..._sd``; over folds ``..._fold_mean`` and
    ``..._fold_sd``) and the three files; returns its id."""
    from magnet.experiment import MlflowConfig
    from magnet.registry.tracking import Tracker

    tracker = Tracker(MlflowConfig(tracking_uri=tracking_uri, experiment=experiment), active=True)
    run_id = tracker.start(run_name, params, tags={"magnet.kind": "evaluation"})
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
        tracker.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)}, step=0)
        for p in paths.values():
            tracker.log_artifact(p, "evaluation")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    return run_id

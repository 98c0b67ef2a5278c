"""After the Tuner: one MLflow child run per trial with its status, the summary table and the
metric-against-hyperparameter plot on the parent run, and the best finished trial's model
registered under ``mlflow.register_as`` with ``mlflow.alias`` (``sweep-best``). Before a resumed
Tuner: the child runs a killed sweep left RUNNING are closed."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param

from magnet.errors import UserError
from magnet.io import atomic_write_text
from magnet.registry.tracking import flatten, set_alias
from magnet.sweep.config import SweepConfig
from magnet.sweep.scheduler import stopped_trials
from magnet.sweep.space import leaves

MLFLOW_STATUS = {"finished": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}


def trial_rows(grid, cfg: SweepConfig, base, sweep_dir: Path) -> list[dict]:
    """One row per trial: id, status, values, steps, last metric, error (last line)."""
    stopped = stopped_trials(sweep_dir)
    rows = []
    for result in grid:
        params = dict(result.config or {})
        metrics = result.metrics or {}
        steps = int(params.get("train.steps", base.train.steps))
        trial = Path(result.path).name
        if result.error is not None:
            status = "failed"
        elif trial in stopped:
            status = "stopped_early"
        elif metrics.get("step", 0) >= steps or (sweep_dir / "runs" / trial / "model" / "model_meta.json").is_file():
            status = "finished"  # its last step reported, or a closed-form model (no SGD step) written
        else:
            status = "unfinished"  # the sweep was interrupted (Tune saved its state)
        error = ""
        if result.error is not None:
            lines = [line.strip() for line in str(result.error).splitlines() if line.strip()]
            error = lines[-1][:300] if lines else type(result.error).__name__
        value = metrics.get(cfg.search.metric)
        rows.append({"trial": trial, "status": status, **params, "step": metrics.get("step", 0),
                     cfg.search.metric: float(value) if value is not None else math.nan, "error": error})
    return sorted(rows, key=lambda r: r["trial"])


def _children(client, parent_id: str) -> list:
    """The parent's child runs, the most recently started first."""
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=10000, order_by=["attributes.start_time DESC"])


def close_interrupted(tracking_uri: str, parent_id: str) -> list[str]:
    """End as KILLED (tag ``sweep.status`` interrupted) every child run still RUNNING: its trial was
    killed with the sweep. A trial resumed from its checkpoint reopens its run; one killed before its
    first checkpoint starts over in a new run of the same name, and this one stays KILLED. Returns
    the closed run ids."""
    client = MlflowClient(tracking_uri=tracking_uri)
    closed = [r.info.run_id for r in _children(client, parent_id) if r.info.status == "RUNNING"]
    for run_id in closed:
        client.set_tag(run_id, "sweep.status", "interrupted")
        client.set_terminated(run_id, "KILLED")
    return closed


def record_children(client, rows: list[dict], parent_id: str, experiment_id: str, metric: str) -> dict[str, str]:
    """Each trial's child run ends with its status (a trial that failed before its run started gets
    one now, with its values); returns trial -> child run id. Of a trial's runs, the latest started
    is its own (older ones were interrupted, see :func:`close_interrupted`)."""
    by_name: dict = {}
    for r in _children(client, parent_id):
        by_name.setdefault(r.info.run_name, r)
    out = {}
    for row in rows:
        run = by_name.get(row["trial"])
        if run is None:
            run = client.create_run(experiment_id, run_name=row["trial"], tags={"mlflow.parentRunId": parent_id})
            client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in flatten(_values(row, metric)).items()])
        run_id = run.info.run_id
        client.set_tag(run_id, "sweep.status", row["status"])
        if row["error"]:
            client.set_tag(run_id, "sweep.error", row["error"])
        if row["status"] != "finished" or client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, MLFLOW_STATUS[row["status"]])
        out[row["trial"]] = run_id
    return out


def _values(row: dict, metric: str) -> dict:
    return {k: v for k, v in row.items() if k not in ("trial", "status", "step", "error", metric)}


def best_row(rows: list[dict], cfg: SweepConfig) -> dict | None:
    m = cfg.search.metric
    done = [r for r in rows if r["status"] == "finished" and not math.isnan(r[m])]
    if not done:
        return None
    return (max if cfg.search.mode == "max" else min)(done, key=lambda r: r[m])


def tables(rows: list[dict]) -> tuple[str, str]:
    """(CSV, Markdown) of the rows, columns in first-seen order."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    writer.writerows(rows)

    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v if v is not None else "").replace("|", "/")

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def metric_plot(rows: list[dict], params: list[str], metric: str):
    """The metric against each hyperparameter, one panel each, marker by status."""
    import matplotlib  # here, not at import: use("Agg") must not switch the backend of a program importing us

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, axes = plt.subplots(1, max(len(params), 1), figsize=(3.2 * max(len(params), 1), 3), squeeze=False)
    markers = {"finished": "o", "stopped_early": "x", "failed": "s"}
    for ax, key in zip(axes[0], params):
        values = [r.get(key) for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        cats = sorted({str(v) for v in values})
        for status, marker in markers.items():
            pts = [(r.get(key) if numeric else cats.index(str(r.get(key))), r[metric]) for r in rows
                   if r["status"] == status and not math.isnan(r[metric])]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=status)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats, rotation=30, fontsize=7)
        elif min(values) > 0 and max(values) / min(values) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _register(client, cfg: SweepConfig, model_uri: str, run_id: str) -> str:
    """Register the model and set the alias; a resumed sweep whose alias already names this run's
    model keeps that version."""
    name, alias = cfg.mlflow.register_as, cfg.mlflow.alias
    found = client.search_registered_models(filter_string=f"name = '{name}'")
    if alias and found and alias in found[0].aliases:
        current = client.get_model_version(name, found[0].aliases[alias])
        if current.run_id == run_id:
            return str(current.version)
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    version = str(mlflow.register_model(model_uri, name).version)
    if alias:
        set_alias(name, version, alias)
    return version


def finish_sweep(grid, cfg: SweepConfig, base, parent_id: str, sweep_dir: Path, tracker) -> dict:
    client = MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    rows = trial_rows(grid, cfg, base, sweep_dir)
    unfinished = sum(r["status"] == "unfinished" for r in rows)
    if unfinished:
        raise UserError(f"{sweep_dir}: sweep interrupted with {unfinished} unfinished trials; continue it with --resume")
    experiment_id = client.get_run(parent_id).info.experiment_id
    children = record_children(client, rows, parent_id, experiment_id, cfg.search.metric)
    text_csv, text_md = tables(rows)
    atomic_write_text(sweep_dir / "summary.csv", text_csv)
    atomic_write_text(sweep_dir / "summary.md", text_md)
    tracker.log_text(text_csv, "summary.csv")
    tracker.log_text(text_md, "summary.md")
    fig = metric_plot(rows, list(leaves(cfg.space)), cfg.search.metric)
    fig.savefig(sweep_dir / "metric_vs_params.png", dpi=100)
    tracker.log_figure(fig, "metric_vs_params.png")
    counts = {s: sum(r["status"] == s for r in rows) for s in MLFLOW_STATUS}
    summary = {"sweep_dir": str(sweep_dir), "parent_run_id": parent_id, "trials": rows, "children": children,
               "counts": counts, "best": None}
    best = best_row(rows, cfg)
    tracker.set_tags({f"sweep.{k}": v for k, v in counts.items()})
    if best is not None:
        run_id = children[best["trial"]]
        model_uri = client.get_run(run_id).data.tags.get("model_uri")
        version = None
        if model_uri and cfg.mlflow.register_as:
            version = _register(client, cfg, model_uri, run_id)
        summary["best"] = {"trial": best["trial"], "run_id": run_id, "value": best[cfg.search.metric],
                           "model_uri": model_uri, "model_version": version}
        tracker.set_tags({"sweep.best_trial": best["trial"], "sweep.best_run_id": run_id,
                          "sweep.best_value": best[cfg.search.metric], "sweep.best_model_version": version or ""})
    return summary

"""Learning curves: a split's per-gene PCC against optimizer steps and CPU-seconds, from training runs in MLflow.

Each run logs ``val/pcc_gene`` at every evaluation (``train.eval_every``) and ``cpu_s`` (the training process's
CPU seconds) at every step; the curves put them side by side, with the oracle and the local oracle of the same
split (``magnet evaluate`` prints them) as horizontal lines. The figure goes to a PNG and, as an artifact, to a
new MLflow run of the same experiment.

    python bench/learning_curves.py --tracking-uri sqlite:///context/mlruns.db --experiment ceiling \
        --runs stnet_s600 magnet_s600 --oracle 0.710 --local-oracle 0.504 --out docs/learning_curves_16um.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402


def collect(tracking_uri: str, experiment: str, runs: list[str], metric: str = "val/pcc_gene") -> dict[str, list]:
    """run name -> [(step, cpu_s, metric)] at each evaluation, in step order (the newest run of each name)."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"learning_curves: {tracking_uri}: no experiment '{experiment}'")
    out = {}
    for name in runs:
        found = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        if not found:
            raise SystemExit(f"learning_curves: {tracking_uri}: no run named '{name}' in '{experiment}'")
        rid = found[0].info.run_id
        cpu = {m.step: m.value for m in client.get_metric_history(rid, "cpu_s")}
        out[name] = [(m.step, cpu.get(m.step, float("nan")), m.value)
                     for m in sorted(client.get_metric_history(rid, metric), key=lambda m: m.step)]
    return out


def plot(curves: dict[str, list], oracle: float | None, local_oracle: float | None, out: Path,
         title: str = "") -> Path:
    """Two panels (steps, CPU-seconds); returns ``out``."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, col, label in ((axes[0], 0, "optimizer steps"), (axes[1], 1, "CPU-seconds (training process)")):
        for name, rows in curves.items():
            ax.plot([r[col] for r in rows], [r[2] for r in rows], marker="o", ms=3, label=name)
        for value, text, style in ((oracle, "oracle", "--"), (local_oracle, "local oracle", ":")):
            if value is not None:
                ax.axhline(value, color="k", ls=style, lw=1, label=text)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation per-gene PCC")
    axes[1].legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracking-uri", required=True)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--runs", nargs="+", required=True, help="MLflow run names (train.run_name)")
    ap.add_argument("--metric", default="val/pcc_gene")
    ap.add_argument("--oracle", type=float)
    ap.add_argument("--local-oracle", type=float)
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    curves = collect(args.tracking_uri, args.experiment, args.runs, args.metric)
    plot(curves, args.oracle, args.local_oracle, args.out, args.title)
    for name, rows in curves.items():
        print(name, " ".join(f"{s}:{v:.3f}@{c:.0f}s" for s, c, v in rows))
    mlflow.set_tracking_uri(args.tracking_uri)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="learning_curves"):
        mlflow.log_params({"runs": ",".join(args.runs), "metric": args.metric})
        mlflow.log_artifact(str(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""PNG figures for MLflow: loss curves and predicted-vs-measured gene maps of a validation slide."""

from __future__ import annotations

import numpy as np


def _figure(*args, **kw):
    import matplotlib  # here, not at import: use("Agg") must not switch the backend of a program importing us

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    return plt.subplots(*args, **kw)


def loss_curves(train_rows: list[dict], eval_rows: list[dict]):
    fig, ax = _figure(figsize=(6, 4))
    if train_rows:
        ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    return fig


def gene_maps(pos: np.ndarray, pred: np.ndarray, true: np.ndarray, genes: list[str], slide: str):
    """One row per gene: measured and predicted expression at the bin positions (um)."""
    n = pred.shape[1]
    fig, axes = _figure(n, 2, figsize=(7, 3.2 * n), squeeze=False)
    for g in range(n):
        lo, hi = np.percentile(true[:, g], [1, 99]) if len(true) else (0, 1)
        for ax, values, title in ((axes[g, 0], true[:, g], "measured"), (axes[g, 1], pred[:, g], "predicted")):
            ax.scatter(pos[:, 0], pos[:, 1], c=values, s=4, vmin=lo, vmax=hi, cmap="viridis")
            ax.set_title(f"{genes[g]} {title}", fontsize=9)
            ax.set_aspect("equal")
            ax.invert_yaxis()
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(slide)
    fig.tight_layout()
    return fig

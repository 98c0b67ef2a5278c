"""PNG maps of predicted (and, when present, measured) expression of chosen genes, one file per gene."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet.io import atomic_path


def gene_map(xy_um: np.ndarray, pred: np.ndarray, measured: np.ndarray | None, gene: str, title: str, bin_um: float):
    import matplotlib  # here, not at import: use("Agg") must not switch the backend of a program importing us

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    panels = [("measured", measured), ("predicted", pred)] if measured is not None else [("predicted", pred)]
    ref = measured if measured is not None else pred
    lo, hi = np.percentile(ref, [1, 99]) if len(ref) else (0.0, 1.0)
    span = np.ptp(xy_um, axis=0).max() if len(xy_um) else 1.0
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.5), squeeze=False)
    size = max(0.5, (72 * 4 * bin_um / max(span, bin_um)) ** 2)  # marker area ~ one bin on the page
    for ax, (name, values) in zip(axes[0], panels):
        sc = ax.scatter(xy_um[:, 0], xy_um[:, 1], c=values, s=size, marker="s", vmin=lo, vmax=hi, cmap="viridis",
                        linewidths=0)
        ax.set_title(f"{gene} {name}", fontsize=10)
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.set_xlabel("um")
    fig.colorbar(sc, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return fig


def write_maps(folder: Path, xy_um: np.ndarray, pred: np.ndarray, measured: np.ndarray | None, genes: list[str],
               chosen: list[str], title: str, bin_um: float) -> list[Path]:
    """``folder/{gene}.png`` for each of ``chosen`` (names in ``genes``); each written atomically."""
    import matplotlib.pyplot as plt  # here, not at import: gene_map chooses the backend when drawing

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for gene in chosen:
        g = genes.index(gene)
        fig = gene_map(xy_um, pred[:, g], None if measured is None else measured[:, g], gene, title, bin_um)
        path = folder / f"{gene}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        out.append(path)
    return out

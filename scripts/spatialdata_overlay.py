"""A predicted gene next to the measured one on the H&E, drawn by spatialdata-plot from the SpatialData
store of `magnet predict --format spatialdata` (docs/spatialdata.md walks through it).

    python scripts/spatialdata_overlay.py pred.zarr GENE overlay.png
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import spatialdata as sd  # noqa: E402
import spatialdata_plot  # noqa: E402,F401  (registers the .pl accessor)
from matplotlib.colors import Normalize  # noqa: E402


def overlay(store: str, gene: str, out: str) -> None:
    sdata = sd.read_zarr(store)
    table_name = next(name for name in sdata.tables if name.startswith("magnet_square_"))
    table = sdata.tables[table_name]
    bins = table.uns["spatialdata_attrs"]["region"]  # the shapes the table annotates
    image = next(iter(sdata.images))
    slide = next(iter(sdata.coordinate_systems))  # full-resolution pixels of the slide
    g = table.var_names.get_loc(gene)
    layers = [("measured", "measured"), (None, "predicted")] if "measured" in table.layers else [(None, "predicted")]
    ref = table.layers[layers[0][0]] if layers[0][0] else table.X
    ref = np.asarray(ref[:, g].todense() if hasattr(ref, "todense") else ref[:, g]).ravel()
    norm = Normalize(*np.percentile(ref, [1, 99]))  # one colour scale for both panels (same units)
    fig, axes = plt.subplots(1, len(layers), figsize=(7 * len(layers), 6), squeeze=False, gridspec_kw={"wspace": 0.4})
    units = table.uns["magnet"]["units"]["method"]
    for ax, (layer, label) in zip(axes[0], layers):
        (sdata.pl.render_images(image)
            .pl.render_shapes(bins, color=gene, table_name=table_name, table_layer=layer, norm=norm, cmap="magma",
                              fill_alpha=0.75)
            .pl.show(coordinate_systems=slide, ax=ax, title=f"{gene} {label} ({units})"))
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    overlay(*sys.argv[1:])

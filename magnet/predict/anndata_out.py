"""The prediction as an .h5ad (AnnData's on-disk format), in scanpy's Visium layout so ``scanpy.pl.spatial``
draws it, written while the bins are predicted: the slide's bin x gene matrices never sit in RAM.

``X``: predicted bin expression in the training normalisation (``uns['magnet']['units']``), dense float32;
``layers['measured']``: the measured expression, same normalisation, CSR (Space Ranger input only);
``layers['rate']``: for a count model (``loss.bin`` poisson / nb), the predicted rate per unit exposure, so that
``rate * library size`` is a bin's expected count (magnet/models/counts.py); ``obs['predicted_libsize']``: for a
count model trained with ``loss.libsize``, the bin's predicted library size (then ``X`` is the expected
normalised value under both; else ``X = log1p(rate * target_sum)``);
``obs``: barcodes, ``in_tissue``, ``array_row``/``array_col``, ``magnet_tile``/``magnet_spot`` (rows of
the spot- and global-level predictions in ``uns['magnet']['spot'|'global']``); ``obsm['spatial']``:
bin centres in full-resolution px (x, y); ``uns['spatial'][slide]``: hires/lowres images and scale factors.
Rows are in prediction order (tile by tile, then array row and column), not Space Ranger's matrix order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from magnet.predict.slide import SlidePrediction
from magnet.spaceranger_layout import Outs
from sharding.samples import SlideImage, thumbnail


def spatial_images(image_path: Path, mpp_full: float, spatial_dir: Path | None, hires_px: int, lowres_px: int) -> dict:
    """Space Ranger's ``tissue_{hires,lowres}_image.png`` and scale factors when given, else made from the image."""
    if spatial_dir is not None:
        sf = json.loads((spatial_dir / Outs.SCALEFACTORS).read_text())
        paths = {k: Outs.image(spatial_dir, k) for k in Outs.IMAGES}
        if all(p.is_file() for p in paths.values()) and all(f"tissue_{k}_scalef" in sf for k in paths):
            images = {}
            for k, p in paths.items():
                with Image.open(p) as im:  # converted only when not RGB: one decoded copy at a time
                    images[k] = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
            return {"images": images, "scalefactors": {f"tissue_{k}_scalef": float(sf[f"tissue_{k}_scalef"])
                                                       for k in paths}}
    images, scalefactors = {}, {}
    with SlideImage(image_path) as image:
        longest = max(image.size)
        hires_mpp = mpp_full * max(1.0, longest / hires_px)
        hires = thumbnail(image, mpp_full, hires_mpp)
    images["hires"] = hires
    scalefactors["tissue_hires_scalef"] = mpp_full / hires_mpp
    low_scale = min(1.0, lowres_px / max(hires.shape[:2]))
    size = (max(1, round(hires.shape[1] * low_scale)), max(1, round(hires.shape[0] * low_scale)))
    images["lowres"] = np.asarray(Image.fromarray(hires).resize(size, Image.Resampling.BOX))
    scalefactors["tissue_lowres_scalef"] = scalefactors["tissue_hires_scalef"] * size[0] / hires.shape[1]
    return {"images": images, "scalefactors": scalefactors}


def bin_obs(pred: SlidePrediction):
    """The bins' obs, rows in ``pred.order``: barcodes, in_tissue, array indices, tile and spot rows."""
    import pandas as pd  # start-up time: the CLI imports this module

    b, o = pred.bins, pred.order
    return pd.DataFrame({
        "in_tissue": np.ones(len(o), np.int64),
        "array_row": b.rc[o, 0].astype(np.int64),
        "array_col": b.rc[o, 1].astype(np.int64),
        "magnet_tile": pred.bin_tile[o],
        "magnet_spot": pred.bin_spot[o],
    }, index=pd.Index(b.barcodes[o].astype(str), name="barcode"))


ARRAY = {"encoding-type": "array", "encoding-version": "0.2.0"}
BUFFER_BYTES = 8 << 20  # predictions gathered before a write to the file (then a copy of them, and of measured)


class H5adWriter:
    """A bin sink for :func:`magnet.predict.slide.stream_slide` that writes the .h5ad at ``path`` as rows come:
    ``X`` a dense dataset filled block by block, ``layers['measured']`` CSR whose ``data``/``indices`` grow;
    :meth:`finish` adds the O(n)-sized parts (obs, var, obsm, uns) with anndata's own element writer.
    Columns ``keep`` of both are also kept in RAM (n x len(keep)), in row order, for the PNG maps."""

    def __init__(self, path: Path, keep: list[int] = (), extras: tuple[str, ...] = ()):
        import h5py  # start-up time: the CLI imports this module

        self.file = h5py.File(path, "w")
        self.keep = list(keep)
        self.extras = extras  # the model's per-bin extras (pyfunc bin_extras): layers['rate'], obs['predicted_libsize']
        self.row = 0
        self.buffer: list[tuple[np.ndarray, np.ndarray | None, dict]] = []
        self.buffered = 0  # bytes of predictions in the buffer

    def __enter__(self) -> "H5adWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def open(self, n: int, n_genes: int, measured: bool) -> None:
        from anndata.io import write_elem  # start-up time: the CLI imports this module

        f = self.file
        f.create_dataset("X", (n, n_genes), np.float32).attrs.update(ARRAY)
        write_elem(f, "layers", {})
        if "rate" in self.extras:
            f["layers"].create_dataset("rate", (n, n_genes), np.float32).attrs.update(ARRAY)
        self.libsize = np.empty(n, np.float32) if "libsize" in self.extras else None
        self.measured = None
        if measured:
            g = f["layers"].create_group("measured")
            g.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0",
                            "shape": np.array([n, n_genes])})
            for name, dtype in (("data", np.float32), ("indices", np.int32)):
                g.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(1 << 16,))
            g.create_dataset("indptr", (n + 1,), np.int64)[0] = 0
            self.measured = g
        self.nnz = 0
        self.kept_pred = np.empty((n, len(self.keep)), np.float32)
        self.kept_measured = np.empty((n, len(self.keep)), np.float32) if measured else None

    def write(self, idx: np.ndarray, pred: np.ndarray, measured: np.ndarray | None, extra: dict) -> None:
        self.buffer.append((pred, measured, extra))
        self.buffered += pred.nbytes
        if self.buffered >= BUFFER_BYTES:
            self._flush()

    def _flush(self) -> None:
        if not self.buffer:
            return
        pred = np.concatenate([p for p, _, _ in self.buffer])
        rows = slice(self.row, self.row + len(pred))
        self.file["X"][rows] = pred
        if "rate" in self.extras:
            self.file["layers"]["rate"][rows] = np.concatenate([e["rate"] for _, _, e in self.buffer])
        if self.libsize is not None:
            self.libsize[rows] = np.concatenate([e["libsize"] for _, _, e in self.buffer])
        self.kept_pred[rows] = pred[:, self.keep]
        if self.measured is not None:
            m = np.concatenate([m for _, m, _ in self.buffer])
            self.kept_measured[rows] = m[:, self.keep]
            r, c = np.nonzero(m)  # row-major: CSR order
            end = self.nnz + len(r)
            for name, values in (("data", m[r, c]), ("indices", c.astype(np.int32))):
                self.measured[name].resize((end,))
                self.measured[name][self.nnz:end] = values
            per_row = np.bincount(r, minlength=len(m))
            self.measured["indptr"][rows.start + 1:rows.stop + 1] = self.nnz + np.cumsum(per_row)
            self.nnz = end
        self.row = rows.stop
        self.buffer.clear()
        self.buffered = 0

    def finish(self, pred: SlidePrediction, genes: list[str], gene_ids: list[str], units: dict, images: dict,
               info: dict) -> None:
        """Write obs, var, obsm and uns (rows in ``pred.order``); every row must have been written."""
        # start-up time: the CLI imports this module
        import pandas as pd
        from anndata.io import write_elem

        self._flush()
        n = len(pred.order)
        if self.row != n:
            raise RuntimeError(f"{n - self.row} of {n} bins were not written")
        b, o = pred.bins, pred.order
        f = self.file
        f.attrs.update({"encoding-type": "anndata", "encoding-version": "0.1.0"})
        obs = bin_obs(pred)
        if self.libsize is not None:
            obs["predicted_libsize"] = self.libsize
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame({"gene_ids": list(gene_ids), "feature_types": "Gene Expression"},
                                          index=pd.Index(list(genes), name="gene")))
        write_elem(f, "obsm", {"spatial": np.ascontiguousarray(b.xy[o], dtype=np.float64)})
        for name in ("varm", "obsp", "varp"):
            write_elem(f, name, {})
        scalefactors = dict(images["scalefactors"])
        scalefactors.update(spot_diameter_fullres=pred.bin_um / pred.mpp_full, bin_size_um=float(pred.bin_um),
                            microns_per_pixel=pred.mpp_full)
        write_elem(f, "uns", {
            "spatial": {pred.slide: {"images": images["images"], "scalefactors": scalefactors,
                                     "metadata": {"source": "magnet predict"}}},
            "magnet": {
                "units": {k: v for k, v in units.items() if v is not None},
                "bin_um": pred.bin_um,
                "grid": "spaceranger" if pred.from_spaceranger else "tissue_detection",
                "spot": {"X": pred.spot_pred, "spatial": pred.spot_xy, "tissue": pred.spot_tissue},
                "global": {"X": pred.global_pred, "spatial": pred.global_xy, "grid": pred.tile_grid},
                "seconds": pred.seconds,
                **{k: v for k, v in info.items() if v is not None},
            },
        })

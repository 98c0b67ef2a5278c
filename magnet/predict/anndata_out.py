"""The prediction as AnnData, in scanpy's Visium layout so ``scanpy.pl.spatial`` draws it.

``X``: predicted bin expression in the training normalisation (``uns['magnet']['units']``);
``layers['measured']``: the measured expression, same normalisation (Space Ranger input only);
``obs``: barcodes, ``in_tissue``, ``array_row``/``array_col``, ``magnet_tile``/``magnet_spot`` (rows of
the spot- and global-level predictions in ``uns['magnet']['spot'|'global']``); ``obsm['spatial']``:
bin centres in full-resolution px (x, y); ``uns['spatial'][slide]``: hires/lowres images and scale factors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from magnet.io import atomic_path
from magnet.predict.slide import SlidePrediction
from sharding.image import SlideImage


def spatial_images(image_path: Path, mpp_full: float, spatial_dir: Path | None, hires_px: int, lowres_px: int) -> dict:
    """Space Ranger's ``tissue_{hires,lowres}_image.png`` and scale factors when given, else made from the image."""
    from PIL import Image

    if spatial_dir is not None:
        sf = json.loads((spatial_dir / "scalefactors_json.json").read_text())
        paths = {k: spatial_dir / f"tissue_{k}_image.png" for k in ("hires", "lowres")}
        if all(p.is_file() for p in paths.values()) and all(f"tissue_{k}_scalef" in sf for k in paths):
            images = {}
            for k, p in paths.items():
                with Image.open(p) as im:
                    images[k] = np.asarray(im.convert("RGB"))
            return {"images": images, "scalefactors": {f"tissue_{k}_scalef": float(sf[f"tissue_{k}_scalef"])
                                                       for k in paths}}
    from magnet.predict.grid import thumbnail

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


def to_anndata(pred: SlidePrediction, genes: list[str], gene_ids: list[str], units: dict, images: dict, info: dict):
    import anndata as ad
    import pandas as pd

    b = pred.bins
    obs = pd.DataFrame({
        "in_tissue": np.ones(len(b.barcodes), np.int64),
        "array_row": b.rc[:, 0].astype(np.int64),
        "array_col": b.rc[:, 1].astype(np.int64),
        "magnet_tile": pred.bin_tile,
        "magnet_spot": pred.bin_spot,
    }, index=pd.Index(b.barcodes.astype(str), name="barcode"))
    var = pd.DataFrame({"gene_ids": list(gene_ids), "feature_types": "Gene Expression"},
                       index=pd.Index(list(genes), name="gene"))
    adata = ad.AnnData(X=pred.bin_pred, obs=obs, var=var)
    adata.obsm["spatial"] = np.ascontiguousarray(b.xy, dtype=np.float64)
    if pred.measured is not None:
        adata.layers["measured"] = pred.measured
    scalefactors = dict(images["scalefactors"])
    scalefactors.update(spot_diameter_fullres=pred.bin_um / pred.mpp_full, bin_size_um=float(pred.bin_um),
                        microns_per_pixel=pred.mpp_full)
    adata.uns["spatial"] = {pred.slide: {"images": images["images"], "scalefactors": scalefactors,
                                         "metadata": {"source": "magnet predict"}}}
    adata.uns["magnet"] = {
        "units": {k: v for k, v in units.items() if v is not None},
        "bin_um": pred.bin_um,
        "grid": "spaceranger" if pred.from_spaceranger else "tissue_detection",
        "spot": {"X": pred.spot_pred, "spatial": pred.spot_xy, "tissue": pred.spot_tissue},
        "global": {"X": pred.global_pred, "spatial": pred.global_xy, "grid": pred.tile_grid},
        "seconds": pred.seconds,
        **{k: v for k, v in info.items() if v is not None},
    }
    return adata


def write_h5ad(adata, out: Path) -> None:
    """Written under a temporary name and renamed: never half-written under ``out``."""
    with atomic_path(out, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp)

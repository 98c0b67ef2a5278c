"""One slide through a loaded model into its ``.h5ad`` or SpatialData store (and config, and optional PNG maps):
the single-slide ``magnet predict`` and each cohort worker call the same function, so both write the same file."""

from __future__ import annotations

import resource
from pathlib import Path

from magnet.config import save_config
from magnet.io import atomic_path
from magnet.predict.anndata_out import H5adWriter, spatial_images
from magnet.predict.config import PredictConfig
from magnet.predict.model import LoadedModel
from magnet.predict.slide import stream_slide
from magnet.predict.spatialdata_out import SpatialDataWriter
from magnet.spaceranger_layout import Outs
from sharding.samples import read_genes


def predict_to_file(model: LoadedModel, image: Path, bin_um: int, cfg: PredictConfig, out: Path, *,
                    spaceranger: Path | None = None, mpp: float | None = None, chosen: list[str] = (),
                    maps_dir: Path | None = None, slide: str | None = None, fmt: str = "h5ad") -> dict:
    """Predict ``image`` and write ``out`` atomically (temporary name, renamed when complete), its
    ``{stem}.config.yaml`` beside it and, for ``chosen`` genes, PNG maps in ``maps_dir``; return the summary.
    ``slide`` names the slide in ``uns['spatial']`` (default: the image name up to its first dot). ``fmt``:
    ``h5ad`` or ``spatialdata`` (a zarr store, magnet/predict/spatialdata_out.py)."""
    genes = model.genes
    layout = Outs.find(spaceranger) if spaceranger else None
    outs = layout.path if layout else None
    spatial_dir = layout.bin_spatial(bin_um) if layout else None
    gene_ids = genes
    if layout is not None:
        ids, names = read_genes(layout.bin_matrix(bin_um))
        id_of = dict(zip(names, ids))
        gene_ids = [id_of.get(g, g) for g in genes]
    info = {"model": model.source, "image": str(Path(image).resolve()),
            "spaceranger": str(outs.resolve()) if outs else None, "geometry": model.python_model.geometry.to_dict()}
    out = Path(out)
    keep = [genes.index(g) for g in chosen]
    extras = model.python_model.bin_extras
    with atomic_path(out) as tmp, (H5adWriter(tmp, keep, extras) if fmt == "h5ad"
                                   else SpatialDataWriter(tmp, Path(image), bin_um, keep)) as writer:
        pred = stream_slide(model, Path(image), bin_um, cfg, writer, spaceranger=outs, mpp=mpp, slide=slide)
        if fmt == "h5ad":
            images = spatial_images(Path(image), pred.mpp_full, spatial_dir, cfg.hires_px, cfg.lowres_px)
            writer.finish(pred, genes, gene_ids, model.python_model.normalisation, images, info)
        else:
            writer.finish(pred, genes, gene_ids, model.python_model.normalisation, info)
    save_config(cfg, out.parent / f"{out.stem}.config.yaml", model=model.source, bin_um=bin_um)
    maps = []
    if chosen:
        from magnet.predict.maps import write_maps  # start-up time: the CLI imports this module

        maps = write_maps(Path(maps_dir), pred.bins.xy[pred.order] * pred.mpp_full, writer.kept_pred,
                          writer.kept_measured, list(chosen), list(chosen), f"{pred.slide} ({bin_um} um bins)", bin_um)
    n = len(pred.bins.barcodes)
    return {"out": str(out), "slide": pred.slide, "bins": n, "genes": len(genes), "tiles": len(pred.tile_grid),
            "bins_per_s": round(n / max(pred.seconds["total"], 1e-9), 1), "seconds": pred.seconds,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "maps": [str(p) for p in maps]}

"""``magnet predict``: a registered model and a slide to an AnnData (.h5ad) of predicted HD expression, or to a
SpatialData zarr store (``--format spatialdata``: image, bins as shapes, tables; docs/spatialdata.md)."""

from __future__ import annotations

import argparse

USAGE = """examples:
  magnet predict --model models:/magnet-hd@champion --spaceranger outs --image he.tif --bin-um 8 --out pred.h5ad
  magnet predict --model runs:/RUN_ID/model --image he.tif --mpp 0.2738 --out pred.h5ad --genes EPCAM,CD3E --maps maps
  magnet predict --model models:/magnet-hd@champion --spaceranger outs --image he.tif --format spatialdata \
      --out pred.zarr
  magnet predict --model runs/NAME/model ... [--config FILE] [key=value ...]   (keys: magnet/predict/config.py)"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict HD gene expression of a slide (AnnData + PNG gene maps)",
                              description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder")
    p.add_argument("--image", required=True, help="full-resolution H&E image (TIFF, pyramidal or not; PNG; JPEG)")
    p.add_argument("--spaceranger", default=None, help="Space Ranger outs/ folder: bins, barcodes, pixel size")
    p.add_argument("--mpp", type=float, default=None, help="image-only input: microns per pixel of --image")
    p.add_argument("--bin-um", type=int, default=None, help="bin size in um (default: the model's)")
    p.add_argument("--out", required=True, help="output .h5ad, or the SpatialData store's folder (.zarr)")
    p.add_argument("--format", choices=("h5ad", "spatialdata"), default="h5ad",
                   help="AnnData .h5ad (scanpy layout) or SpatialData zarr store (scverse tools)")
    p.add_argument("--genes", default=None, help="comma-separated genes to draw with --maps")
    p.add_argument("--maps", default=None, help="folder for PNG gene maps ({gene}.png)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    p.add_argument("--config", default=None, help="YAML predict config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=8 device=cpu")
    p.set_defaults(run=run)


def _check_args(args) -> list[str]:
    from pathlib import Path

    from magnet.errors import UserError

    if not Path(args.image).is_file():
        raise UserError(f"{args.image}: --image: file not found")
    if args.spaceranger is None and args.mpp is None:
        raise UserError(f"{args.image}: --mpp: needed without --spaceranger (the image's microns per pixel)")
    if args.spaceranger is not None and args.mpp is not None:
        raise UserError(f"{args.spaceranger}: --mpp: not used with --spaceranger (its scalefactors give the pixel size)")
    if args.mpp is not None and not args.mpp > 0:
        raise UserError(f"{args.image}: --mpp: must be > 0, got {args.mpp}")
    if args.spaceranger is not None and not Path(args.spaceranger).is_dir():
        raise UserError(f"{args.spaceranger}: --spaceranger: folder not found")
    if args.format == "spatialdata":
        import importlib.util

        if importlib.util.find_spec("spatialdata") is None:
            raise UserError("--format: spatialdata needs the [spatialdata] extra "
                            "(pip install 'magnet-hd[spatialdata]')")
        from magnet.predict.spatialdata_out import check_out

        check_out(Path(args.out))
    if (args.genes is None) != (args.maps is None):
        raise UserError("--genes/--maps: give both (genes to draw and the folder for their maps)")
    return [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []


def _terminated(signum, frame):
    raise SystemExit(128 + signum)  # unwinds the with-blocks: the temporary .h5ad is removed


def run(args) -> int:
    """A scheduler's SIGTERM exits 143 without half-written output (the handler is restored after)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    import json
    import resource
    from pathlib import Path

    from magnet.config import load_config, save_config
    from magnet.errors import UserError
    from magnet.predict.config import PredictConfig

    chosen = _check_args(args)
    cfg = load_config(PredictConfig, args.config, args.overrides)
    from magnet.predict.model import load_model

    model = load_model(args.model, args.tracking_uri)
    genes = model.genes
    unknown = [g for g in chosen if g not in genes]
    if unknown:
        raise UserError(f"{args.model}: --genes: '{unknown[0]}' is not among the model's {len(genes)} genes "
                        f"({', '.join(genes[:5])}, ...)")
    bin_um = args.bin_um if args.bin_um is not None else int(model.python_model.bin_um)
    if bin_um != int(model.python_model.bin_um):
        raise UserError(f"{args.model}: --bin-um: {bin_um} um, but the model was trained on "
                        f"{model.python_model.bin_um} um bins")

    from magnet.io import atomic_path
    from magnet.predict.anndata_out import H5adWriter, spatial_images
    from magnet.predict.slide import spaceranger_outs, stream_slide

    outs = spaceranger_outs(Path(args.spaceranger)) if args.spaceranger else None
    spatial_dir = outs / "binned_outputs" / f"square_{bin_um:03d}um" / "spatial" if outs else None
    gene_ids = genes
    if outs is not None:
        from sharding.reader import read_genes

        ids, names = read_genes(outs / "binned_outputs" / f"square_{bin_um:03d}um" / "filtered_feature_bc_matrix.h5")
        id_of = dict(zip(names, ids))
        gene_ids = [id_of.get(g, g) for g in genes]
    info = {"model": model.source, "image": str(Path(args.image).resolve()),
            "spaceranger": str(outs.resolve()) if outs else None, "geometry": model.python_model.geometry.to_dict()}
    out = Path(args.out)
    keep = [genes.index(g) for g in chosen]
    if args.format == "spatialdata":
        from magnet.predict.spatialdata_out import SpatialDataWriter
    with atomic_path(out, suffix=f".{args.format}") as tmp, (
            H5adWriter(tmp, keep) if args.format == "h5ad" else
            SpatialDataWriter(tmp, Path(args.image), bin_um, keep)) as writer:
        pred = stream_slide(model, Path(args.image), bin_um, cfg, writer, spaceranger=outs, mpp=args.mpp)
        if args.format == "h5ad":
            images = spatial_images(Path(args.image), pred.mpp_full, spatial_dir, cfg.hires_px, cfg.lowres_px)
            writer.finish(pred, genes, gene_ids, model.python_model.normalisation, images, info)
        else:
            writer.finish(pred, genes, gene_ids, model.python_model.normalisation, info)
    save_config(cfg, out.parent / f"{out.stem}.config.yaml", model=model.source, bin_um=bin_um)
    maps = []
    if chosen:
        from magnet.predict.maps import write_maps

        maps = write_maps(Path(args.maps), pred.bins.xy[pred.order] * pred.mpp_full, writer.kept_pred,
                          writer.kept_measured, chosen, chosen, f"{pred.slide} ({bin_um} um bins)", bin_um)
    n = len(pred.bins.barcodes)
    print(json.dumps({"out": str(out), "bins": n, "genes": len(genes), "tiles": len(pred.tile_grid),
                      "bins_per_s": round(n / max(pred.seconds["total"], 1e-9), 1), "seconds": pred.seconds,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "maps": [str(p) for p in maps]}))
    return 0

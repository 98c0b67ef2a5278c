"""``magnet predict``: a registered model and a slide (or a samplesheet's cohort, on Ray) to AnnData (.h5ad)
of predicted HD expression, or to a SpatialData zarr store (``--format spatialdata``; docs/spatialdata.md)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from magnet.config import load_config
from magnet.errors import UserError
from magnet.io import check_not_input, check_output, exit_on_sigterm
from magnet.predict.cells import write_cells
from magnet.predict.cohort import predict_cohort
from magnet.predict.config import PredictConfig
from magnet.predict.model import load_model
from magnet.predict.output import predict_to_file
from magnet.predict.spatialdata_out import check_out
from magnet.spaceranger_layout import Outs
from sharding.samplesheet import read_samplesheet

USAGE = """examples:
  magnet predict --model models:/magnet-hd@champion --spaceranger outs --image he.tif --bin-um 8 --out pred.h5ad
  magnet predict --model runs:/RUN_ID/model --image he.tif --mpp 0.2738 --out pred.h5ad --genes EPCAM,CD3E --maps maps
  magnet predict --model models:/magnet-2um@champion --spaceranger outs --image he.tif --bin-um 2 --out pred.h5ad \
      --cells spaceranger          (or --cells cells.geojson: any segmenter's polygons; writes pred.cells.h5ad)
  magnet predict --model models:/magnet-hd@champion --samplesheet slides.csv --out preds [--address auto]
  magnet predict --model models:/magnet-hd@champion --spaceranger outs --image he.tif --format spatialdata \
      --out pred.zarr
  magnet predict --model runs/NAME/model ... [--config FILE] [key=value ...]   (keys: magnet/predict/config.py)
An existing --out (or its .config.yaml, or a map) is refused unless --overwrite; a cohort's folder is resumed
(slides already written are skipped) unless --overwrite, which predicts every slide again."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict HD gene expression of a slide (AnnData + PNG gene maps)",
                              description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a folder")
    p.add_argument("--image", default=None, help="full-resolution H&E image (TIFF, pyramidal or not; PNG; JPEG)")
    p.add_argument("--samplesheet", default=None,
                   help="a cohort instead of --image (slide,spaceranger,image): one DIR/{slide}.h5ad each, on Ray")
    p.add_argument("--address", default=None, help="with --samplesheet: Ray cluster address ('auto'); default local")
    p.add_argument("--slide", default=None, help="slide name in uns['spatial'] (default: the image name)")
    p.add_argument("--spaceranger", default=None, help="Space Ranger outs/ folder: bins, barcodes, pixel size")
    p.add_argument("--mpp", type=float, default=None, help="image-only input: microns per pixel of --image")
    p.add_argument("--bin-um", type=int, default=None, help="bin size in um (default: the model's)")
    p.add_argument("--out", required=True, help="output .h5ad or SpatialData .zarr (with --samplesheet: a folder)")
    p.add_argument("--format", choices=("h5ad", "spatialdata"), default="h5ad",
                   help="AnnData .h5ad (scanpy layout) or SpatialData zarr store (scverse tools)")
    p.add_argument("--cells", default=None, metavar="spaceranger|GEOJSON",
                   help="2 um models: also OUT_STEM.cells.h5ad, the bins pooled per cell of Space Ranger 4's "
                        "segmentation ('spaceranger', with --spaceranger) or of the polygons of a GeoJSON file")
    p.add_argument("--genes", default=None, help="comma-separated genes to draw with --maps")
    p.add_argument("--maps", default=None, help="folder for PNG gene maps ({gene}.png; a cohort: {slide}/{gene}.png)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (its .config.yaml and maps); with --samplesheet: predict every "
                        "slide again (default: a re-run skips slides already written)")
    p.add_argument("--config", default=None, help="YAML predict config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=8 device=cpu")
    p.set_defaults(run=run)


def _check_args(args) -> list[str]:
    if args.samplesheet is not None:
        given = [f for f in ("image", "spaceranger", "mpp", "slide") if getattr(args, f) is not None]
        if given:
            raise UserError(f"{args.samplesheet}: --{given[0]}: not used with --samplesheet (the samplesheet names "
                            f"each slide's files)")
        if not Path(args.samplesheet).is_file():
            raise UserError(f"{args.samplesheet}: --samplesheet: file not found")
        if args.format != "h5ad":
            raise UserError(f"{args.samplesheet}: --format: a cohort is written as one .h5ad per slide")
        if args.cells is not None:
            raise UserError(f"{args.samplesheet}: --cells: one slide at a time")
    elif args.image is None:
        raise UserError("--image: needed (or --samplesheet for a cohort)")
    elif args.address is not None:
        raise UserError(f"{args.address}: --address: only with --samplesheet")
    elif not Path(args.image).is_file():
        raise UserError(f"{args.image}: --image: file not found")
    if args.samplesheet is None and args.spaceranger is None and args.mpp is None:
        raise UserError(f"{args.image}: --mpp: needed without --spaceranger (the image's microns per pixel)")
    if args.spaceranger is not None and args.mpp is not None:
        raise UserError(f"{args.spaceranger}: --mpp: not used with --spaceranger (its scalefactors give the pixel size)")
    if args.mpp is not None and not args.mpp > 0:
        raise UserError(f"{args.image}: --mpp: must be > 0, got {args.mpp}")
    if args.spaceranger is not None and not Path(args.spaceranger).is_dir():
        raise UserError(f"{args.spaceranger}: --spaceranger: folder not found")
    if args.format == "spatialdata":
        if importlib.util.find_spec("spatialdata") is None:
            raise UserError("--format: spatialdata needs the [spatialdata] extra "
                            "(pip install 'magnet-hd[spatialdata]')")
    if args.cells is not None and args.format != "h5ad":
        raise UserError(f"{args.out}: --cells: pooled from the .h5ad (--format h5ad)")
    if args.cells not in (None, "spaceranger") and not Path(args.cells).is_file():
        raise UserError(f"{args.cells}: --cells: file not found")
    if (args.genes is None) != (args.maps is None):
        raise UserError("--genes/--maps: give both (genes to draw and the folder for their maps)")
    chosen = [g.strip() for g in args.genes.split(",") if g.strip()] if args.genes else []
    _check_outputs(args, chosen)
    return chosen


def _check_outputs(args, chosen: list[str]) -> None:
    """Every path the command will write, before any work: never one of its inputs, nothing replaced without
    --overwrite (a cohort's existing folder is its resume), the --format's extension, no folder where a file goes,
    no path under a file or an unwritable folder."""


    out, maps = Path(args.out), Path(args.maps) if args.maps else None
    if args.samplesheet is not None:  # a cohort's existing folder is its resume
        check_output(out, "--out", overwrite=True, folder=True)
    inputs = _inputs(args)
    sidecar = None if args.samplesheet is not None else out.parent / f"{out.stem}.config.yaml"
    for path, flag in ((out, "--out"), (sidecar, "--out"), (maps, "--maps")):
        if path is not None:
            check_not_input(path, flag, inputs)
    if maps is not None:
        check_output(maps, "--maps", overwrite=True, folder=True)
    if args.samplesheet is not None:
        return
    _check_extension(out, args.format)
    check_output(out, "--out", args.overwrite, folder=args.format == "spatialdata")
    if args.format == "spatialdata":
        check_out(out)
    check_output(sidecar, "--out", args.overwrite)
    if args.cells is not None:
        check_output(out.parent / f"{out.stem}.cells.h5ad", "--out", args.overwrite)
    for gene in chosen:
        check_output(maps / f"{gene}.png", "--maps", args.overwrite)


def _inputs(args) -> list[tuple[str, str | None]]:
    """What the command reads: its files and folders, and with --samplesheet each slide's."""
    model = None if "://" in args.model or ":/" in args.model else args.model  # a folder; URIs are not paths
    inputs = [("--model", model), ("--image", args.image), ("--spaceranger", args.spaceranger),
              ("--samplesheet", args.samplesheet), ("--config", args.config)]
    if args.samplesheet is not None:
        for e in read_samplesheet(Path(args.samplesheet), check_paths=False):
            inputs += [(f"slide {e.slide}: image", e.image), (f"slide {e.slide}: spaceranger", e.spaceranger)]
    return inputs


def _check_extension(out, fmt: str) -> None:
    """--out names what is written: a .h5ad file for h5ad, a .zarr store for spatialdata."""
    want = {"h5ad": ".h5ad", "spatialdata": ".zarr"}[fmt]
    if out.suffix.lower() != want:
        raise UserError(f"{out}: --out: --format {fmt} writes a {want} {'file' if fmt == 'h5ad' else 'store'}; "
                        f"give --out a {want} name")


def run(args) -> int:
    """A scheduler's SIGTERM exits 143 without half-written output."""
    with exit_on_sigterm():
        return _run(args)


def _run(args) -> int:
    chosen = _check_args(args)
    cfg = load_config(PredictConfig, args.config, args.overrides)
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

    if args.cells is not None and bin_um != 2:
        raise UserError(f"{args.model}: --cells: cells are pooled from 2 um bins; the model predicts {bin_um} um ones")
    if args.samplesheet is not None:
        return _run_cohort(args, model, bin_um, cfg, chosen)

    summary = predict_to_file(model, Path(args.image), bin_um, cfg, Path(args.out), spaceranger=args.spaceranger,
                              mpp=args.mpp, chosen=chosen, maps_dir=args.maps, slide=args.slide, fmt=args.format)
    summary.pop("slide")
    if args.cells is not None:
        out = Path(args.out)
        summary.update(write_cells(out, out.parent / f"{out.stem}.cells.h5ad", args.cells,
                                   Outs.find(args.spaceranger).path if args.spaceranger else None))
    print(json.dumps(summary))
    return 0


def _run_cohort(args, model, bin_um: int, cfg, chosen: list[str]) -> int:
    """Every slide goes on when one fails; the failed ones are listed at the end (exit 2 when all failed on
    bad input such as a missing or unreadable file, else 1)."""
    rows = predict_cohort(Path(args.samplesheet), args.model, args.tracking_uri, model, bin_um, cfg, Path(args.out),
                          args.address, chosen, Path(args.maps) if args.maps else None, args.overwrite)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("predicted", "skipped", "failed")}
    print(json.dumps({"out": args.out, "summary": str(Path(args.out) / "summary.csv"), "slides": len(rows),
                      **counts, "bins": sum(r["bins"] for r in rows if r["status"] == "predicted")}))
    failed = [r for r in rows if r["status"] == "failed"]
    if not failed:
        return 0
    message = (f"{args.samplesheet}: {len(failed)} of {len(rows)} slides failed: "
               + "; ".join(f"{r['slide']} ({r['error']})" for r in failed))
    if all(r.get("user_error") for r in failed):
        raise UserError(message)
    print(f"magnet: error: {message}", file=sys.stderr)
    return 1

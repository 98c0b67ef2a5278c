"""``magnet evaluate``: models on held-out slides, the paper's table (MSE, MAE, PCC both ways) plus the oracle."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from magnet.config import load_config, save_config, to_dict
from magnet.errors import UserError
from magnet.evaluate import paired
from magnet.evaluate.config import EvaluateConfig
from magnet.evaluate.select import each_model, load_models, parse_genes, select_slides
from magnet.evaluate.truth import gene_groups_file, read_gene_groups
from magnet.io import atomic_path, check_not_input, check_output
from magnet.registry.tracking import check_tracking_uri, mask_credentials, resolve_tracking_uri
from magnet.train_config import MlflowConfig
from sharding.samplesheet import read_samplesheet

USAGE = """examples:
  magnet evaluate --model models:/magnet-hd@champion --model stnet=models:/magnet-hd-stnet@champion \\
      --samplesheet held_out.csv --bin-um 8 16 --out eval
  magnet evaluate --model runs/a/model --model runs/b/model --samplesheet slides.csv --split test --out eval
  magnet evaluate --model magnet=runs/fold0/model --model magnet=runs/fold1/model --samplesheet slides.csv --out cv
  magnet evaluate --model magnet=runs/s0/model,runs/s1/model,runs/s2/model --model stnet=URI1,URI2,URI3 \\
      --samplesheet slides.csv --split test --gene-groups groups.csv --compare magnet:stnet --out eval
Each model is scored at the bin size it was trained on and at spot level, on every slide of the samplesheet
(or those of --split); a slide the model trained on is refused. Cross-validation: models of one label each
trained with data.fold=k form one row; each slide is scored by the model of its fold (its split reads
fold<k> unless the samplesheet's split column gives one), and the table adds mean ± sd over folds (a fold:
the mean over its slides). Replicates (one label, several models without a fold: LABEL=URI1,URI2,... or
the label repeated) are scored each as LABEL#k, and the table adds mean ± sd over them. Every MagNet model
is also scored under the context controls (controls=[zero,shuffle]; magnet/predict/context.py): rows
"LABEL (context zeroed)" and "LABEL (context shuffled)". Per gene group (the slides' ground_truth/gene_groups.csv,
or --gene-groups) and paired comparisons (--compare A:B, default: the first model against each other one; and
each MagNet model against its controls): per-gene PCC difference, bootstrap 95% interval, Wilcoxon p (magnet/evaluate/paired.py),
with a scatter OUT/scatter_<A>_vs_<B>_<bin>um.png per pair. Writes OUT/evaluation.{md,csv},
OUT/evaluation_{slides,genes,groups,paired,replicates}.csv and OUT/evaluate.config.yaml (the folder appears
whole when complete; an existing one is refused unless --overwrite), and logs them to MLflow (mlflow=false
to skip; run_id=ID logs into an existing run).
Keys of --config / key=value: magnet/evaluate/config.py (predict.* as in magnet predict)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="score models on held-out slides (Markdown/CSV table, MLflow)",
                              description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="[LABEL=]MODEL",
                   help="models:/NAME@ALIAS, runs:/ID/model or a folder; repeat to compare (label: the model's name); "
                        "one per fold under one label for cross-validation")
    p.add_argument("--samplesheet", required=True, help="CSV: slide,spaceranger,image[,split] of held-out slides")
    p.add_argument("--split", default=None, help="only the slides of this split (samplesheet column, else the "
                                                 "models' shard manifest), e.g. test")
    p.add_argument("--bin-um", type=int, nargs="+", default=None, metavar="UM",
                   help="bin sizes to report; every model must be trained at one of them (default: the models')")
    p.add_argument("--genes", default=None, help="genes to score: A,B,C or a file with one per line "
                                                 "(default: the first model's)")
    p.add_argument("--gene-groups", default=None, metavar="FILE",
                   help="CSV gene,group (default: the slides' ground_truth/gene_groups.csv where present)")
    p.add_argument("--compare", action="append", default=[], metavar="A:B",
                   help="a paired comparison of two table labels, e.g. magnet:stnet or 'magnet:oracle'; repeat "
                        "for more (default: the first model against each other one); each MagNet model is also "
                        "compared with its context controls")
    p.add_argument("--out", required=True, help="output folder (written whole, under a temporary name, at the end)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out written by magnet evaluate")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)")
    p.add_argument("--config", default=None, help="YAML evaluate config")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. top_k=20 mlflow=false")
    p.set_defaults(run=run)


CONFIG_NAME = "evaluate.config.yaml"


def check_out(out, overwrite: bool, inputs: list[tuple[str, str | None]] = ()) -> None:
    """Before any work: ``out`` is none of the ``inputs`` (nor holds one), and is absent, empty, or (with
    ``overwrite``) a folder that magnet evaluate wrote."""
    check_not_input(out, "--out", list(inputs))
    check_output(out, "--out", overwrite, folder=True)
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise UserError(f"{out}: --out: --overwrite replaces only a folder written by magnet evaluate (no "
                        f"{CONFIG_NAME} there); refusing to delete it")


def _inputs(args) -> list[tuple[str, str | None]]:
    """What the command reads from files: models given as folders, the samplesheet and its slides' files, gene
    lists, gene groups, config."""
    models = [uri.strip() for spec in args.model
              for uri in (spec.partition("=")[2] if "=" in spec.split(":", 1)[0] else spec).split(",")]
    inputs = [("--model", m) for m in models if m and ":/" not in m]  # a folder; URIs are not paths
    inputs += [("--samplesheet", args.samplesheet), ("--gene-groups", args.gene_groups), ("--config", args.config),
               ("--genes", args.genes if args.genes and Path(args.genes).is_file() else None)]
    if Path(args.samplesheet).is_file():
        for e in read_samplesheet(args.samplesheet, check_paths=False):
            inputs += [(f"slide {e.slide}: image", e.image), (f"slide {e.slide}: spaceranger", e.spaceranger)]
    return inputs


def check_logging_uri(uri: str) -> None:
    """The tracking URI the results will be logged to is refused now when the tracker would refuse it at the end
    (credentials in it, an unreachable server)."""
    try:
        MlflowConfig(tracking_uri=uri)
    except ValueError as e:
        raise UserError(f"{mask_credentials(uri)}: --tracking-uri: {str(e).split(': ', 1)[-1]}") from None
    check_tracking_uri(uri, "--tracking-uri", existing=False)


def run(args) -> int:
    cfg = load_config(EvaluateConfig, args.config, args.overrides)
    out = Path(args.out)
    check_out(out, args.overwrite, _inputs(args))
    genes = parse_genes(args.genes)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    if cfg.mlflow:  # before any work: the scores are not computed to be lost at the end
        check_logging_uri(tracking_uri)
    models = load_models(args.model, args.tracking_uri, args.bin_um)
    genes = genes or next(each_model(models))[2].genes
    slides = select_slides(args.samplesheet, args.split, models)
    from magnet.evaluate import report  # start-up time: these load torch; the other commands and --help do not
    from magnet.evaluate.table import Table  # start-up time: the CLI imports this module

    groups_path = args.gene_groups or next((str(gene_groups_file(e.spaceranger)) for e, _, _ in slides
                                            if gene_groups_file(e.spaceranger).is_file()), None)
    groups = read_gene_groups(Path(groups_path), genes) if groups_path else None
    t0 = time.perf_counter()
    table = Table(models, genes, cfg)
    for entry, split, scorer in slides:
        table.add_slide(entry, split, scorer)
    rows = table.results()
    pccs = paired.gene_pccs(rows)
    pairs = paired.pairs_to_compare(pccs, cfg.controls, paired.parse_pairs(args.compare, pccs) if args.compare else None)
    index = paired.group_index(genes, groups)
    group_rows = paired.group_rows(pccs, index)
    comparisons, plots = [], []
    for a, b in pairs:
        for bin_um in sorted({k[0] for k in pccs}):
            if (bin_um, a) in pccs and (bin_um, b) in pccs:
                comparisons += paired.compare(pccs[(bin_um, a)], pccs[(bin_um, b)], index, cfg.seed, cfg.bootstrap)
                plots.append((pccs[(bin_um, a)], pccs[(bin_um, b)],
                              f"scatter_{paired.slug(a)}_vs_{paired.slug(b)}_{bin_um}um"))
    notes = [f"Slide {e.slide} is a validation slide of a model: its scores may be optimistic."
             for e, split, _ in slides if split == "val"]
    if groups is not None:
        notes.append(f"Gene groups: {groups_path}.")
    sources = {label if fold is None else f"{label}/fold{fold}": m.source for label, fold, m in each_model(models)}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        paths = report.write(tmp, rows, cfg.top_k, notes, group_rows, comparisons,
                             paired.genes_csv(pccs, genes, groups))
        for a, b, name in plots:
            paths[name] = paired.scatter(a, b, genes, groups, tmp / f"{name}.png")
        paths["config"] = save_config(cfg, tmp / CONFIG_NAME, models=sources, genes=genes,
                                      samplesheet=str(Path(args.samplesheet).resolve()),
                                      slides={e.slide: split for e, split, _ in slides})
    paths = {k: out / p.name for k, p in paths.items()}
    run_id = None
    if cfg.mlflow:
        params = {"models": {paired.mlflow_key(k): v["uri"] for k, v in sources.items()}, "samplesheet": args.samplesheet,
                  "slides": ",".join(e.slide for e, _, _ in slides), "n_genes": len(genes), "config": to_dict(cfg)}
        run_id = report.log_mlflow(tracking_uri, cfg.experiment, cfg.run_name or time.strftime("evaluate-%Y%m%d-%H%M%S"),
                                   rows, paths, params, report.analysis_metrics(group_rows, comparisons), cfg.run_id)
    print(report.markdown(rows, cfg.top_k, notes).split("\n\n")[1])
    print("\n\n".join(report.analysis_markdown([], group_rows if groups is not None else [], comparisons, cfg.top_k)))
    print(json.dumps({"out": {k: str(v) for k, v in paths.items()}, "slides": len(slides), "genes": len(genes),
                      "mlflow_run_id": run_id, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0

"""Mistyped input to each command, walked as a table: exit status 2, one line `magnet: error:` naming the
file or field, no traceback, nothing left behind, and a failure in seconds, not minutes (an unreachable
tracking server took about 4 minutes; a mistyped sqlite path created folders and an empty database)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from magnet.dist import free_port

REPO = Path(__file__).resolve().parents[1]
DEAD = "http://127.0.0.1:{port}"  # a loopback port nothing listens on


def _cases(tmp: Path, port: int) -> dict[str, tuple[list[str], str]]:
    dead = DEAD.format(port=port)
    missing_db = f"sqlite:///{tmp}/no/such/folder/mlruns.db"
    tiny = str(REPO / "configs/train/tiny.yaml")
    return {
        "registry: mistyped sqlite path": (
            ["magnet", "registry", "promote", "m", "1", "--tracking-uri", missing_db], "database file not found"),
        "registry: unreachable server": (
            ["magnet", "registry", "promote", "m", "1", "--tracking-uri", dead], "no tracking server answers"),
        "predict: unreachable server": (
            ["magnet", "predict", "--model", "models:/m@champion", "--tracking-uri", dead, "--image", tiny, "--mpp",
             "0.5", "--out", str(tmp / "p.h5ad")], "no tracking server answers"),
        "predict: s3 model without its client": (
            ["magnet", "predict", "--model", "s3://bucket/model", "--image", tiny, "--mpp", "0.5",
             "--out", str(tmp / "p.h5ad")], "needs the Python package 'boto3'"),
        "train: unreachable server": (
            ["magnet", "train", "--config", tiny, f"train.out_dir={tmp / 'runs'}", "mlflow.enabled=true",
             f"mlflow.tracking_uri={dead}"], "mlflow.tracking_uri: no tracking server answers"),
        "train: NaN learning rate": (
            ["magnet", "train", "--config", tiny, f"train.out_dir={tmp / 'runs'}", "optim.lr=nan"], "optim.lr"),
        "sweep: unreachable server": (
            [str(REPO / "launch/sweep.py"), "--config", str(REPO / "configs/sweep/tiny.yaml"), f"out_dir={tmp / 'sweeps'}",
             f"mlflow.tracking_uri={dead}"], "mlflow.tracking_uri: no tracking server answers"),
    }


CASE_NAMES = list(_cases(Path("/x"), 1))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_is_one_line_in_seconds(case, tmp_path):
    argv, words = _cases(tmp_path, free_port())[case]
    cmd = [sys.executable, "-m", "magnet", *argv[1:]] if argv[0] == "magnet" else [sys.executable, *argv]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    took = time.monotonic() - started
    errors = [line for line in proc.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert took < 60, took  # generous for a loaded 2-core machine; the unreachable server took about 240 s
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))


# -- the whole table: each command's cheap bad inputs, with the files they meet -----------------------------------
# A row: (command words, expected words in the one error line, files made first in the working folder: relative
# path -> text, or None for a folder). Those files must come out as they went in, and nothing may be added.
SHEET = "slide,spaceranger,image\n"
BAD_JSON = {"sh/16um/manifest.json": "not json {", "sh/8um/manifest.json": "not json {"}
IMG = {"he.tif": "not read before the outputs are checked"}
PRED = ["magnet", "predict", "--model", "m", "--image", "he.tif", "--mpp", "0.5"]
EVAL = ["magnet", "evaluate", "--model", "m", "--samplesheet", "s.csv"]
TRAIN = ["magnet", "train", "--config", str(REPO / "configs/train/tiny.yaml"), "data.shards=sh", "train.out_dir=runs"]
SWEEP = [str(REPO / "launch/sweep.py"), "--config", str(REPO / "configs/sweep/tiny.yaml"), "out_dir=sweeps",
         f"train_config={REPO / 'configs/train/tiny.yaml'}", "shards.8=sh", "shards.16=sh",
         "mlflow.tracking_uri=sqlite:///mlruns.db"]
EXPERIMENT = [str(REPO / "launch/experiment.py"), "--config", str(REPO / "configs/experiment/tiny.yaml"),
              "out_dir=experiments", f"train_config={REPO / 'configs/train/tiny.yaml'}", "evaluate.samplesheet=s.csv",
              "mlflow.tracking_uri=sqlite:///mlruns.db"]
ROWS = [
    # predict: outputs, checked before the model is loaded (here it does not even exist)
    ("predict: existing --out", [*PRED, "--out", "p.h5ad"], "p.h5ad: --out: exists; pass --overwrite",
     {**IMG, "p.h5ad": "an earlier prediction"}),
    ("predict: --out is a folder", [*PRED, "--out", "p.h5ad", "--overwrite"], "p.h5ad: --out: is a directory",
     {**IMG, "p.h5ad": None}),
    ("predict: --out under a file", [*PRED, "--out", "f/p.h5ad"], "f is a file, not a directory", {**IMG, "f": "x"}),
    ("predict: --out in a folder nobody can write", [*PRED, "--out", "/proc/magnet/p.h5ad"], "cannot write in /proc",
     IMG),
    ("predict: its config exists", [*PRED, "--out", "p.h5ad"], "p.config.yaml: --out: exists; pass --overwrite",
     {**IMG, "p.config.yaml": "an earlier run's"}),
    ("predict: a map exists", [*PRED, "--out", "p.h5ad", "--genes", "A", "--maps", "maps"],
     "maps/A.png: --maps: exists; pass --overwrite", {**IMG, "maps/A.png": "an earlier map"}),
    ("predict: --maps is a file", [*PRED, "--out", "p.h5ad", "--genes", "A", "--maps", "maps"],
     "maps: --maps: is a file; expected a folder", {**IMG, "maps": "x"}),
    ("predict: --overwrite onto a folder that is no SpatialData store",
     [*PRED, "--out", "p.zarr", "--format", "spatialdata", "--overwrite"], "not a SpatialData store",
     {**IMG, "p.zarr/mine.txt": "x"}),
    ("predict: cohort --out is a file", ["magnet", "predict", "--model", "m", "--samplesheet", "s.csv", "--out", "o"],
     "o: --out: is a file; expected a folder", {"s.csv": SHEET, "o": "x"}),
    # predict: arguments and config
    ("predict: --mpp not a number", [*PRED[:-1], "abc", "--out", "p.h5ad"], "argument --mpp: invalid float value", IMG),
    ("predict: --mpp negative", [*PRED[:-1], "-1", "--out", "p.h5ad"], "--mpp: must be > 0", IMG),
    ("predict: --format unknown", [*PRED, "--out", "p.h5ad", "--format", "loom"], "argument --format: invalid choice",
     IMG),
    ("predict: image missing", [*PRED, "--out", "p.h5ad"], "he.tif: --image: file not found", {}),
    ("predict: neither --image nor --samplesheet", ["magnet", "predict", "--model", "m", "--out", "p.h5ad"],
     "--image: needed", {}),
    ("predict: --genes without --maps", [*PRED, "--out", "p.h5ad", "--genes", "A"], "--genes/--maps: give both", IMG),
    ("predict: samplesheet missing", ["magnet", "predict", "--model", "m", "--samplesheet", "s.csv", "--out", "o"],
     "s.csv: --samplesheet: file not found", {}),
    ("predict: model folder missing", [*PRED, "--out", "p.h5ad"], "m: --model: folder not found", IMG),
    ("predict: unknown key", [*PRED, "--out", "p.h5ad", "batch_sizee=2"], "unknown key 'batch_sizee'", IMG),
    ("predict: wrong type", [*PRED, "--out", "p.h5ad", "batch_size=abc"], "'batch_size' expects int", IMG),
    ("predict: negative value", [*PRED, "--out", "p.h5ad", "batch_size=-1"], "must be >= 0", IMG),
    ("predict: override without =", [*PRED, "--out", "p.h5ad", "batch_size"], "not of the form key.sub=value", IMG),
    ("predict: --config missing", [*PRED, "--out", "p.h5ad", "--config", "c.yaml"], "file not found: c.yaml", IMG),
    # evaluate: its --out folder before anything is loaded
    ("evaluate: existing --out", [*EVAL, "--out", "e"], "e: --out: exists; pass --overwrite", {"e/mine.txt": "x"}),
    ("evaluate: --overwrite onto a folder it did not write", [*EVAL, "--out", "e", "--overwrite"],
     "replaces only a folder written by magnet evaluate", {"e/mine.txt": "x"}),
    ("evaluate: --out is a file", [*EVAL, "--out", "e"], "e: --out: is a file; expected a folder", {"e": "x"}),
    ("evaluate: --out under a file", [*EVAL, "--out", "f/e"], "f is a file, not a directory", {"f": "x"}),
    ("evaluate: --out in a folder nobody can write", [*EVAL, "--out", "/proc/magnet-e"], "cannot write in /proc", {}),
    ("evaluate: unknown key", [*EVAL, "--out", "e", "top_kk=1"], "unknown key 'top_kk'", {}),
    ("evaluate: out-of-range value", [*EVAL, "--out", "e", "top_k=-1"], "top_k and oracle_draws must be >= 1", {}),
    ("evaluate: --bin-um not a number", [*EVAL, "--out", "e", "--bin-um", "x"], "argument --bin-um: invalid int", {}),
    ("evaluate: model folder missing", [*EVAL, "--out", "e"], "m: --model: folder not found", {}),
    ("evaluate: label with a replicate mark", [*EVAL[:3], "a#1=m", *EVAL[4:], "--out", "e"],
     "a label holds neither '#' nor '('", {}),
    # registry
    ("registry: version missing", ["magnet", "registry", "promote", "m"], "arguments are required: version", {}),
    ("registry: unknown action", ["magnet", "registry", "demote", "m", "1"], "invalid choice: 'demote'", {}),
    # shard and shard validate
    ("shard validate: manifest not JSON", ["magnet", "shard", "validate", "sh/16um"], "manifest.json: not valid JSON",
     BAD_JSON),
    ("shard validate: manifest not text", ["magnet", "shard", "validate", "sh/16um"], "not valid JSON (not UTF-8",
     {"sh/16um/manifest.json": "\udcff\udcfe"}),
    ("shard validate: manifest a JSON list", ["magnet", "shard", "validate", "sh/16um"], "not a manifest (a JSON list",
     {"sh/16um/manifest.json": "[1, 2]"}),
    ("shard validate: folder missing", ["magnet", "shard", "validate", "sh/16um"], "manifest not found", {}),
    ("shard validate: two folders", ["magnet", "shard", "validate", "a", "b"], "expects exactly one folder", {}),
    ("shard: --samplesheet missing", ["magnet", "shard", "--bin-um", "16", "--out", "o"], "--samplesheet is required",
     {}),
    ("shard: samplesheet not found", ["magnet", "shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "s.csv: samplesheet not found", {}),
    ("shard: samplesheet without slides", ["magnet", "shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "s.csv: no slides listed", {"s.csv": SHEET}),
    ("shard: a slide's folder missing", ["magnet", "shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "line 2 (slide a): spaceranger: folder not found", {"s.csv": SHEET + "a,outs,he.tif\n"}),
    ("shard: --bin-um not a number", ["magnet", "shard", "--samplesheet", "s.csv", "--bin-um", "x", "--out", "o"],
     "argument --bin-um: invalid int", {}),
    ("shard: unknown key", ["magnet", "shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o", "shard.foo=1"],
     "unknown key 'shard.foo'", {}),
    # synth
    ("synth: existing --out", ["magnet", "synth", "--out", "s"], "exists and is not empty", {"s/mine.txt": "x"}),
    ("synth: --overwrite onto a folder it did not write", ["magnet", "synth", "--out", "s", "--overwrite"],
     "replaces only a folder written by magnet synth", {"s/mine.txt": "x"}),
    ("synth: --out is a file", ["magnet", "synth", "--out", "s"], "exists and is not a directory", {"s": "x"}),
    ("synth: --out under a file", ["magnet", "synth", "--out", "f/s"], "f is a file, not a directory", {"f": "x"}),
    ("synth: negative --slides", ["magnet", "synth", "--out", "s", "--slides", "-1"], "slides: must be > 0", {}),
    ("synth: --size-um not a number", ["magnet", "synth", "--out", "s", "--size-um", "x"],
     "argument --size-um: invalid float", {}),
    ("synth: unknown key", ["magnet", "synth", "--out", "s", "expression.n_genez=4"],
     "unknown key 'expression.n_genez'", {}),
    # train (magnet train, and launch/train.py as one process)
    ("train: manifest not JSON", TRAIN, "sh/16um/manifest.json: not valid JSON", BAD_JSON),
    ("train: shards missing", TRAIN, "sh/16um/manifest.json: manifest not found", {}),
    ("launch/train.py: manifest not JSON", [str(REPO / "launch/train.py"), *TRAIN[2:]], "not valid JSON", BAD_JSON),
    ("train: --config missing", ["magnet", "train", "--config", "c.yaml"], "file not found: c.yaml", {}),
    ("train: unknown key", [*TRAIN, "optim.lrr=1"], "unknown key 'optim.lrr'", BAD_JSON),
    ("train: wrong type", [*TRAIN, "train.steps=abc"], "'train.steps' expects int", BAD_JSON),
    ("train: negative steps", [*TRAIN, "train.steps=-1"], "train.steps", BAD_JSON),
    ("train: --nproc 0", [*TRAIN, "--nproc", "0"], "--nproc: must be >= 1", BAD_JSON),
    ("train: --nproc not a number", [*TRAIN, "--nproc", "x"], "argument --nproc: invalid int", BAD_JSON),
    ("train: --resume of a run without checkpoints", [*TRAIN, "--resume", "runs/old"],
     "--resume runs/old: no checkpoint found under runs/old", {**BAD_JSON, "runs/old/config.yaml": "x"}),
    ("train: unknown ZeRO config", [*TRAIN, "train.deepspeed=zero9"], "no ZeRO config file 'zero9'", BAD_JSON),
    # launch/sweep.py and launch/experiment.py
    ("sweep: manifest not JSON", SWEEP, "manifest.json: not valid JSON", BAD_JSON),
    ("sweep: unknown key", [*SWEEP, "spacee=1"], "unknown key 'spacee'", BAD_JSON),
    ("sweep: --config missing", [str(REPO / "launch/sweep.py"), "--config", "c.yaml"], "file not found: c.yaml", {}),
    ("experiment: samplesheet missing", EXPERIMENT, "evaluate.samplesheet: no file s.csv", BAD_JSON),
    ("experiment: comparison of no model", [*EXPERIMENT, "evaluate.compare=[a:b]"], "'a:b' is not A:B of models",
     {**BAD_JSON, "s.csv": SHEET}),
    ("experiment: evaluation key unknown", [*EXPERIMENT, "evaluate.overrides=[top_kk=1]"],
     "evaluate.overrides: config: unknown key 'top_kk'", {**BAD_JSON, "s.csv": SHEET}),
    ("experiment: gene groups missing", [*EXPERIMENT, "evaluate.gene_groups=g.csv"], "evaluate.gene_groups: no file",
     {**BAD_JSON, "s.csv": SHEET}),
    ("experiment: manifest not JSON", [*EXPERIMENT, "shards.8=sh", "shards.16=sh"], "manifest.json: not valid JSON",
     {**BAD_JSON, "s.csv": SHEET}),
    ("experiment: wrong type", [*EXPERIMENT, "seeds=abc"], "'seeds' expects list", {}),
]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_leaves_every_file_as_it_was(row, tmp_path):
    _, argv, words, files = row
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        path = tmp_path / rel
        path.mkdir() if text is None else path.write_bytes(text.encode(errors="surrogateescape"))
    before = _tree(tmp_path)
    cmd = [sys.executable, "-m", "magnet", *argv[1:]] if argv[0] == "magnet" else [sys.executable, *argv]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("magnet: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert words in errors[0], errors[0]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == errors, proc.stderr[-3000:]
    assert _tree(tmp_path) == before

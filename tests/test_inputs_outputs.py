"""Inputs are never outputs, a re-run checks what it is re-run on, and other answers that were silently wrong:
each case through the real command (in-process), refused in one line, exit 2, every file as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest

from magnet.cli import main
from test_evaluate import _sheet, _splits

REPO = Path(__file__).resolve().parents[1]
SHEET = "slide,spaceranger,image\n"
PRED = ["predict", "--model", "m", "--image", "he.tif", "--mpp", "0.5"]
IMG = {"he.tif": "not read before the outputs are checked"}
TRAIN_YAML = (REPO / "configs/train/tiny.yaml").read_text()
SWEEP = ["--config", str(REPO / "configs/sweep/tiny.yaml"), "out_dir=sweeps",
         f"train_config={REPO / 'configs/train/tiny.yaml'}", "mlflow.tracking_uri=sqlite:///mlruns.db"]
EXPERIMENT = ["--config", str(REPO / "configs/experiment/tiny.yaml"), "out_dir=experiments",
              f"train_config={REPO / 'configs/train/tiny.yaml'}", "mlflow.tracking_uri=sqlite:///mlruns.db"]

# (case, command: magnet | sweep | experiment, argv, words of the one error line, files made first in the working
# folder: relative path -> text, or None for a folder)
ROWS = [
    ("predict cohort: --out holds its samplesheet", "magnet",
     ["predict", "--model", "m", "--samplesheet", "d/summary.csv", "--out", "d"],
     "d: --out: holds the input d/summary.csv (--samplesheet)", {"d/summary.csv": SHEET + "a,a/outs,a/he.tif\n"}),
    ("predict: --out is its --image", "magnet", [*PRED, "--out", "he.tif", "--overwrite"],
     "he.tif: --out: is the input he.tif (--image)", IMG),
    ("predict: --out replaces a file of its model folder", "magnet",
     [*PRED, "--out", "m/old.h5ad", "--overwrite"], "m/old.h5ad: --out: lies inside, at an existing path, the input m",
     {**IMG, "m/old.h5ad": "the model's"}),
    ("predict: --maps is its Space Ranger folder", "magnet",
     ["predict", "--model", "m", "--image", "he.tif", "--spaceranger", "outs", "--out", "p.h5ad", "--genes", "A",
      "--maps", "outs"], "outs: --maps: is the input outs (--spaceranger)", {**IMG, "outs/x.json": "{}"}),
    ("predict: --format spatialdata into a .h5ad name", "magnet", [*PRED, "--format", "spatialdata", "--out", "p.h5ad"],
     "p.h5ad: --out: --format spatialdata writes a .zarr store", IMG),
    ("predict: --format h5ad into a .zarr name", "magnet", [*PRED, "--out", "p.zarr"],
     "p.zarr: --out: --format h5ad writes a .h5ad file", IMG),
    ("evaluate: --out holds its samplesheet", "magnet",
     ["evaluate", "--model", "m", "--samplesheet", "e/s.csv", "--out", "e", "--overwrite"],
     "e: --out: holds the input e/s.csv (--samplesheet)",
     {"e/s.csv": SHEET + "a,a/outs,a/he.tif\n", "e/evaluate.config.yaml": "an earlier evaluation's"}),
    ("evaluate: credentials in the tracking URI, before any work", "magnet",
     ["evaluate", "--model", "m", "--samplesheet", "s.csv", "--out", "e", "--tracking-uri",
      "http://alice:pw-6d1f0c@127.0.0.1:9"], "http://***@127.0.0.1:9: --tracking-uri: holds credentials", {}),
    ("synth: --overwrite onto the folder of its --config", "magnet",
     ["synth", "--config", "s/config.yaml", "--out", "s", "--overwrite"],
     "s: --out: holds the input s/config.yaml (--config)", {"s/config.yaml": "slides: 1\n"}),
    ("shard: --out holds its samplesheet", "magnet", ["shard", "--samplesheet", "o/s.csv", "--bin-um", "16", "--out", "o"],
     "o: --out: holds the input o/s.csv (--samplesheet)",
     {"o/s.csv": SHEET + "a,a,he.tif\n", "o/a/outs": None, "o/he.tif": "x"}),
    ("shard: one slide's files under two names", "magnet",
     ["shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "line 3 (slide b): image: he.tif is also the image of slide 'a'",
     {"s.csv": SHEET + "a,x,he.tif\nb,x,he.tif\n", "x/outs": None, "he.tif": "x"}),
    ("shard: a Latin-1 samplesheet", "magnet", ["shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "s.csv: line 2: encoding: not UTF-8 (byte 0xe9; Latin-1", {"s.csv": SHEET + "caf\udce9,x,he.tif\n"}),
    ("shard: a UTF-8 byte-order mark is read as UTF-8", "magnet",
     ["shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "s.csv: line 2 (slide a): spaceranger: folder not found", {"s.csv": "\ufeff" + SHEET + "a,outs,he.tif\n"}),
    ("shard: a slide name longer than file names may be", "magnet",
     ["shard", "--samplesheet", "s.csv", "--bin-um", "16", "--out", "o"],
     "s.csv: line 2: slide: 'aaaaaaaaaaaaaaaaaaaa...' has 240 characters; at most 128",
     {"s.csv": SHEET + "a" * 240 + ",outs,he.tif\n"}),
    ("train: the run folder holds its --config", "magnet",
     ["train", "--config", "runs/m/c.yaml", "data.shards=sh", "train.out_dir=runs", "train.run_name=m"],
     "runs/m: train.run_name: holds the input runs/m/c.yaml (--config)", {"runs/m/c.yaml": TRAIN_YAML}),
    ("sweep: the sweep folder holds its shards", "sweep", [*SWEEP, "shards.8=sweeps/tiny/sh", "shards.16=sweeps/tiny/sh"],
     "/sweeps/tiny: name: holds the input", {"sweeps/tiny/sh/16um/manifest.json": "{}"}),
    ("experiment: the experiment folder holds its samplesheet", "experiment",
     [*EXPERIMENT, "evaluate.samplesheet=experiments/tiny/s.csv"],
     "/experiments/tiny: name: holds the input experiments/tiny/s.csv (evaluate.samplesheet)",
     {"experiments/tiny/s.csv": SHEET + "a,a/outs,a/he.tif\n"}),
]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def _command(kind: str):
    if kind == "sweep":
        from launch.sweep import main as sweep

        return sweep
    if kind == "experiment":
        from launch.experiment import main as experiment

        return experiment
    return main


def _one_line(rc: int, capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("magnet: error: "), err
    return err[0]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_refused_in_one_line_with_every_file_as_it_was(row, tmp_path, monkeypatch, capsys):
    _, kind, argv, words, files = row
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir() if text is None else path.write_bytes(text.encode(errors="surrogateescape"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _tree(tmp_path)
    line = _one_line(_command(kind)(argv), capsys)
    assert words in line, line
    assert "pw-6d1f0c" not in line
    assert _tree(tmp_path) == before


def _shard(sheet: Path, out: Path, *bins: str) -> int:
    return main(["shard", "--samplesheet", str(sheet), "--bin-um", *bins, "--out", str(out),
                 "--config", str(REPO / "configs/shard/tiny.yaml"), "ray.num_cpus=1"])


def test_reshard_after_two_slides_swapped_is_refused_naming_the_slide(tiny_cohort, tiny_shards, tmp_path, capsys):
    """The shards record what they were made from (each slide's files and fingerprints): 'up to date' only for
    the same content, wherever the samplesheet lies."""
    out = tmp_path / "shards"
    shutil.copytree(tiny_shards, out)
    before = _tree(out)
    rows = [f"{s},{tiny_cohort / t / 'outs'},{tiny_cohort / t / f'{t}_fullres.tif'}"
            for s, t in (("synth_000", "synth_001"), ("synth_001", "synth_000"), ("synth_002", "synth_002"))]
    sheet = tmp_path / "swapped.csv"
    sheet.write_text(SHEET + "\n".join(rows) + "\n")
    line = _one_line(_shard(sheet, out, "8", "16"), capsys)
    assert "8um/manifest.json: plan: shards of other inputs" in line
    assert "slide 'synth_000': its image is not the one the shards were made from" in line
    assert "synth_000/synth_000_fullres.tif, now" in line and "synth_001/synth_001_fullres.tif)" in line
    assert _tree(out) == before


def test_one_slide_copied_under_another_name_is_refused_before_any_output(tiny_cohort, tmp_path, capsys):
    for name in ("synth_000", "twin"):
        shutil.copytree(tiny_cohort / "synth_000", tmp_path / name)
    (tmp_path / "s.csv").write_text(SHEET + "synth_000,synth_000/outs,synth_000/synth_000_fullres.tif\n"
                                    "twin,twin/outs,twin/synth_000_fullres.tif\n")
    line = _one_line(_shard(tmp_path / "s.csv", tmp_path / "out", "16"), capsys)
    assert "s.csv: slide: 'synth_000' and 'twin' have the same image" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["empty", "foreign"])
def test_cohort_out_holding_a_file_it_did_not_write(content, registered, tiny_cohort, tmp_path, capsys):
    uri, run_dir = registered
    sheet = _sheet(tiny_cohort, tmp_path, ["synth_000"])
    out = tmp_path / "preds"
    out.mkdir()
    theirs = out / "synth_000.h5ad"
    if content == "empty":
        theirs.write_bytes(b"")
    else:
        with h5py.File(theirs, "w") as f:
            f["mine"] = [1, 2, 3]
    before = theirs.read_bytes()
    line = _one_line(main(["predict", "--model", str(run_dir / "model"), "--samplesheet", str(sheet),
                           "--out", str(out)]), capsys)
    why = "not an HDF5 file" if content == "empty" else "no X or uns/magnet/seconds/total"
    assert f"{theirs}: --out: not a slide written by magnet predict ({why})" in line
    assert theirs.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["synth_000.h5ad"]


def test_a_gene_group_named_all_is_refused(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    _, run_dir = registered
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    groups = tmp_path / "groups.csv"
    groups.write_text("gene,group\nTUM01,markers\nTUM02,All\n")
    out = tmp_path / "eval"
    line = _one_line(main(["evaluate", "--model", str(run_dir / "model"), "--samplesheet",
                           str(_sheet(tiny_cohort, tmp_path, held)), "--gene-groups", str(groups), "--out", str(out),
                           "mlflow=false"]), capsys)
    assert f"{groups}: group: 'All' on line 3 is the name of the built-in group of every gene" in line
    assert not out.exists()


@pytest.mark.parametrize("how", ["listed twice", "alias and folder"])
def test_one_model_twice_is_not_two_replicates(how, registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    uri, run_dir = registered
    folder = str(run_dir / "model")
    models = [f"rep={folder},{folder}"] if how == "listed twice" else ["rep=models:/tiny@champion", f"rep={folder}"]
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    out = tmp_path / "eval"
    argv = ["evaluate", *(a for m in models for a in ("--model", m)), "--tracking-uri", uri, "--samplesheet",
            str(_sheet(tiny_cohort, tmp_path, held)), "--out", str(out), "mlflow=false"]
    line = _one_line(main(argv), capsys)
    assert "--model: " in line and "has the weights of" in line and "is not two replicates" in line
    assert not out.exists()

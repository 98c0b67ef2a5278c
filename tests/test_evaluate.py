"""`magnet evaluate` on `tiny_cohort` with the registered tiny model (conftest `registered`): the table with
both PCC protocols and the oracle row, its numbers against an independent NumPy computation, MLflow, bad input."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from magnet.cli import main


def _splits(tiny_shards) -> dict[str, str]:
    return json.loads((tiny_shards / "16um" / "manifest.json").read_text())["splits"]


def _sheet(tiny_cohort, tmp_path, slides: list[str]):
    """A samplesheet of ``slides`` with absolute paths (no split column)."""
    path = tmp_path / "held_out.csv"
    lines = ["slide,spaceranger,image"] + [
        f"{s},{tiny_cohort / s / 'outs'},{tiny_cohort / s / f'{s}_fullres.tif'}" for s in slides]
    path.write_text("\n".join(lines) + "\n")
    return path


def _model_copy(run_dir, tmp_path, shards) -> Path:
    """A copy of the run's model folder whose ``data.shards`` is ``shards``."""
    import yaml

    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    config = next(model.rglob("config.yaml"))
    doc = yaml.safe_load(config.read_text())
    doc["config"]["data"]["shards"] = str(shards)
    config.write_text(yaml.safe_dump(doc))
    return model


def _renamed_copy(tiny_cohort, slide: str, tmp_path) -> Path:
    """A samplesheet of ``slide``'s image and Space Ranger folder copied under the name ``renamed``."""
    copy = tmp_path / "renamed"
    shutil.copytree(tiny_cohort / slide / "outs", copy / "outs")
    shutil.copy(tiny_cohort / slide / f"{slide}_fullres.tif", copy / "renamed_fullres.tif")
    sheet = tmp_path / "copied.csv"
    sheet.write_text(f"slide,spaceranger,image\nrenamed,{copy / 'outs'},{copy / 'renamed_fullres.tif'}\n")
    return sheet


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(registered, tiny_cohort, tiny_shards, tmp_path_factory):
    uri, run_dir = registered
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    out = tmp_path_factory.mktemp("eval")
    sheet = _sheet(tiny_cohort, out, held)
    argv = ["evaluate", "--model", "models:/tiny@champion", "--model", f"folder={run_dir / 'model'}",
            "--tracking-uri", uri, "--samplesheet", str(sheet), "--bin-um", "16", "--out", str(out / "eval"),
            "top_k=5", "oracle_draws=256", "predict.max_bins=100000", "run_name=test-eval"]
    assert main(argv) == 0
    return out / "eval", held[0], uri


def _pcc_per_gene(x, y) -> np.ndarray:
    """np.corrcoef per column; a constant side counts 0 (the metrics' convention)."""
    out = np.zeros(x.shape[1])
    for g in range(x.shape[1]):
        if x[:, g].std() > 0 and y[:, g].std() > 0:
            out[g] = np.corrcoef(x[:, g], y[:, g])[0, 1]
    return out


def _normalised(counts, lib):
    """log1p(counts / library size * 1e4); a bin without counts is all zeros."""
    scale = np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(counts * scale[:, None])


def test_table_has_both_protocols_baselines_and_oracle(evaluated):
    out, slide, _ = evaluated
    md = (out / "evaluation.md").read_text()
    for head in ("MSE", "MAE", "PCC per bin", "PCC per gene", "PCC per gene (top 5)"):
        assert f"| {head} |" in md or f"| {head}" in md
    rows = _rows(out / "evaluation.csv")
    kinds = {(r["level"], r["model"], r["source"]) for r in rows}
    assert {("bins", "magnet", "bin head"), ("bins", "folder", "bin head"), ("bins", "oracle", "expected target given true means"),
            ("spot", "magnet", "bins pooled per spot cell"), ("spot", "magnet", "spot head"),
            ("spot", "oracle", "expected target given true means")} <= kinds
    by = {(r["level"], r["model"], r["source"]): r for r in rows}
    same = by[("bins", "magnet", "bin head")], by[("bins", "folder", "bin head")]
    assert all(float(same[0][m]) == pytest.approx(float(same[1][m])) for m in ("mse", "pcc_gene"))  # one model twice
    oracle = by[("bins", "oracle", "expected target given true means")]
    assert float(oracle["pcc_gene"]) > float(same[0]["pcc_gene"])  # a 2-step model is far from the ceiling
    assert (out / "evaluate.config.yaml").is_file()
    per_slide = _rows(out / "evaluation_slides.csv")
    assert {r["slide"] for r in per_slide} == {slide} and {r["split"] for r in per_slide} == {"val"}
    assert f"Slide {slide} is a validation slide" in md


def test_numbers_match_an_independent_numpy_computation(evaluated, registered, tiny_cohort, tmp_path):
    """Predictions from `magnet predict`, targets and oracle from the raw files, metrics with NumPy."""
    import anndata as ad

    out, slide, uri = evaluated
    outs = tiny_cohort / slide / "outs"
    assert main(["predict", "--model", "models:/tiny@champion", "--tracking-uri", uri, "--spaceranger", str(outs),
                 "--image", str(tiny_cohort / slide / f"{slide}_fullres.tif"), "--out", str(tmp_path / "p.h5ad"),
                 "max_bins=100000", "progress=false"]) == 0
    adata = ad.read_h5ad(tmp_path / "p.h5ad")
    genes, pred = list(adata.var_names), np.asarray(adata.X, np.float64)
    with h5py.File(outs / "binned_outputs/square_016um/filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        barcodes = [b.decode() for b in m["barcodes"][:]]
        names = [g.decode() for g in m["features/name"][:]]
        dense = np.zeros((len(barcodes), len(names)))
        indptr = m["indptr"][:]
        rows = np.repeat(np.arange(len(barcodes)), np.diff(indptr))
        np.add.at(dense, (rows, m["indices"][:]), m["data"][:])
    keep = [barcodes.index(b) for b in adata.obs_names]
    cols = [names.index(g) for g in genes]
    measured = _normalised(dense[keep][:, cols], dense[keep].sum(1))
    with h5py.File(tiny_cohort / slide / "ground_truth/expected_016um.h5") as f:
        gt_rows = {b.decode(): i for i, b in enumerate(f["barcodes"][:])}
        gt_names = [g.decode() for g in f["genes"][:]]
        means = f["expected"][:].astype(np.float64)[[gt_rows[b] for b in adata.obs_names]]
    draws = np.random.default_rng(12345).poisson(means, size=(256,) + means.shape).astype(np.float64)
    gcols = [gt_names.index(g) for g in genes]
    oracle = np.mean([_normalised(d[:, gcols], d.sum(1)) for d in draws], axis=0)  # E[target | Poisson means]

    def row_pcc(x, y):
        return _pcc_per_gene(x.T, y.T).mean()

    got = {(r["model"], r["level"]): r for r in _rows(out / "evaluation_slides.csv") if r["slide"] == slide}
    var = measured.var(0)
    top = np.argsort(-var, kind="stable")[:5]
    for name, x, tol in (("magnet", pred, 1e-5), ("oracle", oracle, 0.02)):  # oracle: two Monte Carlo estimates
        r = got[(name, "bins")]
        assert int(r["n"]) == len(measured)
        assert float(r["mse"]) == pytest.approx(((x - measured) ** 2).mean(), rel=tol)
        assert float(r["mae"]) == pytest.approx(np.abs(x - measured).mean(), rel=tol)
        assert float(r["pcc_bin"]) == pytest.approx(row_pcc(x, measured), abs=tol)
        per_gene = _pcc_per_gene(x, measured)
        assert float(r["pcc_gene"]) == pytest.approx(per_gene.mean(), abs=tol)
        assert float(r["pcc_gene_topk"]) == pytest.approx(per_gene[top].mean(), abs=tol)
    assert float(got[("oracle", "bins")]["mse"]) < float(got[("magnet", "bins")]["mse"])


def test_metrics_are_logged_to_mlflow(evaluated):
    import mlflow

    out, _, uri = evaluated
    row = next(r for r in _rows(out / "evaluation.csv") if r["model"] == "magnet" and r["level"] == "bins")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("magnet-evaluate")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'test-eval'")
    assert run.data.metrics["magnet/16um/pcc_gene"] == pytest.approx(float(row["pcc_gene"]))
    assert "oracle/16um/pcc_bin" in run.data.metrics and "magnet/spot16um_head/mse" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/evaluation.md", "evaluation/evaluation.csv", "evaluation/evaluation_slides.csv"} <= names


def _fails(argv, capsys, out, expect: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: ") and expect in err[0], err
    assert not out.exists()


def test_gene_the_model_was_not_trained_on_is_refused(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    _, run_dir = registered
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    out = tmp_path / "eval"
    _fails(["evaluate", "--model", str(run_dir / "model"), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, held)),
            "--genes", "TUM08,NOTAGENE", "--out", str(out), "mlflow=false"], capsys, out,
           "was not trained on 'NOTAGENE'")


def test_training_slide_is_refused(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    _, run_dir = registered
    train = [s for s, split in _splits(tiny_shards).items() if split == "train"]
    out = tmp_path / "eval"
    _fails(["evaluate", "--model", str(run_dir / "model"), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, train)),
            "--out", str(out), "mlflow=false"], capsys, out, f"'{train[0]}' is a training slide")


def test_training_slide_under_another_name_is_refused(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    """Slide identity by content: a training slide's image and matrix copied under a new name are refused (their
    fingerprints are a training slide's, recorded with the model); the held-out slides still pass."""
    from magnet.evaluate.select import load_models, select_slides

    _, run_dir = registered
    splits = _splits(tiny_shards)
    train = next(s for s, split in splits.items() if split == "train")
    held = [s for s, split in splits.items() if split != "train"]
    models = load_models([str(run_dir / "model")], None, None)
    assert [e.slide for e, _, _ in select_slides(str(_sheet(tiny_cohort, tmp_path, held)), None, models)] == held
    sheet = _renamed_copy(tiny_cohort, train, tmp_path)
    out = tmp_path / "eval"
    _fails(["evaluate", "--model", str(run_dir / "model"), "--samplesheet", str(sheet), "--out", str(out),
            "mlflow=false"], capsys, out, f"'renamed' has the image and matrix of '{train}', a training slide of model")


def test_training_slides_are_refused_without_the_shards(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    """The model carries its slides' splits and fingerprints (model_meta.json): with its shard folder gone, as for
    a registered model on another machine, a training slide is still refused by name and under another name."""
    model = _model_copy(registered[1], tmp_path, tmp_path / "gone")
    meta = json.loads(next(model.rglob("model_meta.json")).read_text())
    splits = _splits(tiny_shards)
    assert {s: r["split"] for s, r in meta["slides"].items()} == splits
    train = next(s for s, split in splits.items() if split == "train")
    out = tmp_path / "eval"
    _fails(["evaluate", "--model", str(model), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, [train])),
            "--out", str(out), "mlflow=false"], capsys, out, f"'{train}' is a training slide of model")
    sheet = _renamed_copy(tiny_cohort, train, tmp_path)
    _fails(["evaluate", "--model", str(model), "--samplesheet", str(sheet), "--out", str(out), "mlflow=false"],
           capsys, out, f"'renamed' has the image and matrix of '{train}', a training slide of model")


def test_existing_evaluation_is_refused_then_replaced_whole(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    """An evaluation folder is refused in one line before any model is loaded; --overwrite replaces the folder whole
    (a file of the earlier run that this one does not write is gone) and only a folder magnet evaluate wrote."""
    _, run_dir = registered
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    out = tmp_path / "eval"
    argv = ["evaluate", "--model", str(run_dir / "model"), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, held)),
            "--out", str(out), "mlflow=false", "oracle=false", "controls=[]", "predict.max_bins=100000"]
    assert main(argv) == 0
    (out / "scatter_earlier.png").write_bytes(b"an earlier run's")
    capsys.readouterr()
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"magnet: error: {out}: --out: exists; pass --overwrite to replace it"]
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "evaluation.md").is_file() and not (out / "scatter_earlier.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_unreadable_shard_manifest_of_a_model_is_one_line(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    """A model written before its slides were recorded with it learns its training slides from the manifest; one
    that is there but not JSON was ignored (and with it the training-slide check): now one line naming it."""
    model = _model_copy(registered[1], tmp_path, tmp_path / "shards")
    meta = next(model.rglob("model_meta.json"))
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "slides"}))  # older model
    bad = tmp_path / "shards" / "16um" / "manifest.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("not json {")
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    out = tmp_path / "eval"
    _fails(["evaluate", "--model", str(model), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, held)),
            "--out", str(out), "mlflow=false"], capsys, out, f"{bad}: not valid JSON (line 1)")

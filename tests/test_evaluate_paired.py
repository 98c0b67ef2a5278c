"""`magnet evaluate` per gene group, over replicates, with the context controls and paired statistics: its numbers
against an independent computation (predictions from `magnet predict`, targets from the raw matrix, PCC with
np.corrcoef, scipy's Wilcoxon, the documented bootstrap redone with NumPy), the scatter plot, MLflow, bad input."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
from scipy.stats import wilcoxon

from magnet.cli import main
from model_copies import noisy_copy
from test_evaluate import _normalised, _pcc_per_gene, _sheet, _splits

SHUFFLED = "rep (context shuffled)"


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _groups_file(path, genes: list[str]) -> dict[str, str]:
    """Genes grouped by their 3-letter program prefix (TUM, HK0...), the first one left out (group 'other')."""
    groups = {g: g[:3] for g in genes[1:]}
    path.write_text("gene,group\n" + "".join(f"{g},{grp}\n" for g, grp in groups.items()))
    return {genes[0]: "other", **groups}


@pytest.fixture(scope="module")
def paired_eval(registered, tiny_cohort, tiny_shards, tmp_path_factory):
    from magnet.predict.model import load_model

    uri, run_dir = registered
    held = sorted(s for s, split in _splits(tiny_shards).items() if split != "train")
    out = tmp_path_factory.mktemp("paired")
    genes = load_model(str(run_dir / "model"), uri).genes
    groups = _groups_file(out / "groups.csv", genes)
    model, model2 = run_dir / "model", noisy_copy(run_dir / "model", out / "rep2")
    argv = ["evaluate", "--model", f"rep={model},{model2}", "--tracking-uri", uri,
            "--samplesheet", str(_sheet(tiny_cohort, out, held)), "--gene-groups", str(out / "groups.csv"),
            "--out", str(out / "eval"), "top_k=5", "oracle_draws=8", "bootstrap=500", "seed=3",
            "controls=[shuffle]", "predict.max_bins=100000", "run_name=test-paired"]
    assert main(argv) == 0
    return out / "eval", held, genes, groups, uri


def _measured(tiny_cohort, slide: str, genes: list[str], barcodes: list[str]) -> np.ndarray:
    outs = tiny_cohort / slide / "outs"
    with h5py.File(outs / "binned_outputs/square_016um/filtered_feature_bc_matrix.h5") as f:
        m = f["matrix"]
        names = [g.decode() for g in m["features/name"][:]]
        codes = [b.decode() for b in m["barcodes"][:]]
        dense = np.zeros((len(codes), len(names)))
        rows = np.repeat(np.arange(len(codes)), np.diff(m["indptr"][:]))
        np.add.at(dense, (rows, m["indices"][:]), m["data"][:])
    keep = [codes.index(b) for b in barcodes]
    return _normalised(dense[keep][:, [names.index(g) for g in genes]], dense[keep].sum(1))


def _predicted_pcc(tiny_cohort, slide: str, uri: str, model: str, tmp_path, context: str) -> tuple[list[str], np.ndarray]:
    """Per-gene PCC of `magnet predict` (with the context control) against the raw matrix."""
    import anndata as ad

    path = tmp_path / f"{slide}_{context}.h5ad"
    assert main(["predict", "--model", model, "--tracking-uri", uri, "--spaceranger", str(tiny_cohort / slide / "outs"),
                 "--image", str(tiny_cohort / slide / f"{slide}_fullres.tif"), "--out", str(path),
                 "max_bins=100000", "progress=false", f"context={context}"]) == 0
    adata = ad.read_h5ad(path)
    genes = list(adata.var_names)
    measured = _measured(tiny_cohort, slide, genes, list(adata.obs_names))
    return genes, _pcc_per_gene(np.asarray(adata.X, np.float64), measured)


def test_groups_replicates_and_paired_statistics_match_numpy_scipy(paired_eval, registered, tiny_cohort, tmp_path):
    out, held, genes, groups, uri = paired_eval
    models = [str(registered[1] / "model"), str(out.parent / "rep2")]
    pcc = {}
    for context, label in (("keep", "rep"), ("shuffle", SHUFFLED)):
        per_rep = []
        for i, model in enumerate(models):
            per_slide = []
            for slide in held:
                got_genes, p = _predicted_pcc(tiny_cohort, slide, uri, model, tmp_path / f"r{i}", context)
                assert got_genes == genes
                per_slide.append(p)
            per_rep.append(per_slide)
        pcc[label] = np.array(per_rep)  # (R, S, G)
    assert not np.allclose(pcc["rep"], pcc[SHUFFLED])  # the control changes the predictions
    assert not np.allclose(pcc["rep"][0], pcc["rep"][1])  # two models

    names = sorted(set(groups.values()))
    members = {g: np.array([i for i, gene in enumerate(genes) if groups[gene] == g]) for g in names}
    members["all"] = np.arange(len(genes))
    got = {(r["model"], r["group"]): r for r in _rows(out / "evaluation_groups.csv") if r["bin_um"] == "16"}
    for label in ("rep", SHUFFLED):
        for g, cols in members.items():
            r = got[(label, g)]
            assert int(r["n_genes"]) == len(cols) and int(r["n_replicates"]) == 2
            assert float(r["pcc_gene"]) == pytest.approx(pcc[label][:, :, cols].mean(), abs=1e-5)
            assert float(r["sd_replicates"]) == pytest.approx(pcc[label][:, :, cols].mean((1, 2)).std(ddof=1),
                                                              abs=1e-5)
            if len(held) > 1:
                assert float(r["sd_slides"]) == pytest.approx(pcc[label][:, :, cols].mean(2).mean(0).std(ddof=1),
                                                              abs=1e-5)
            else:
                assert r["sd_slides"] == ""

    paired = {r["group"]: r for r in _rows(out / "evaluation_paired.csv") if r["a"] == "rep" and r["b"] == SHUFFLED}
    assert set(paired) == set(members)
    d_gene = (pcc["rep"].mean(0) - pcc[SHUFFLED].mean(0)).mean(0)
    checked = 0
    for g, cols in members.items():
        r, dg = paired[g], d_gene[cols]
        assert r["bootstrap_over"] == "genes"  # two slides: resampled over genes
        assert float(r["delta"]) == pytest.approx(dg.mean(), abs=1e-5)
        if np.any(dg != 0):
            assert float(r["wilcoxon_p"]) == pytest.approx(wilcoxon(dg).pvalue, rel=1e-3, abs=1e-6)
        if len(dg) < 5:  # one slide: intervals over genes, none for a group of fewer than 5
            assert r["ci_low"] == r["ci_high"] == "" and r["verdict"] == "too few to tell"
            continue
        boot = dg[np.random.default_rng(3).integers(0, len(dg), (500, len(dg)))].mean(1)  # as documented
        lo, hi = np.percentile(boot, [2.5, 97.5])
        assert float(r["ci_low"]) == pytest.approx(lo, abs=1e-5) and float(r["ci_high"]) == pytest.approx(hi, abs=1e-5)
        want = "rep better" if lo > 0 else f"{SHUFFLED} better" if hi < 0 else "tie"
        assert r["verdict"] == want
        checked += 1
    assert checked >= 2  # "all" and the 15 HK genes at least


def test_tables_plot_and_mlflow(paired_eval):
    import mlflow

    out, held, genes, _, uri = paired_eval
    rows = _rows(out / "evaluation.csv")
    models = {r["model"] for r in rows if r["level"] == "bins"}
    assert {"rep#1", "rep#2", "rep#1 (context shuffled)", "rep#2 (context shuffled)", "oracle"} <= models
    reps = {(r["level"], r["model"], r["source"]): r for r in _rows(out / "evaluation_replicates.csv")}
    each = [float(next(r for r in rows if r["model"] == f"rep#{i}" and r["level"] == "bins")["pcc_gene"])
            for i in (1, 2)]
    rep = reps[("bins", "rep", "bin head")]
    assert int(rep["n_replicates"]) == 2 and float(rep["pcc_gene"]) == pytest.approx(np.mean(each))
    assert float(rep["pcc_gene_sd"]) == pytest.approx(np.std(each, ddof=1)) and np.std(each) > 0
    md = (out / "evaluation.md").read_text()
    for section in ("## Over replicates", "## Per gene group", "## Paired comparisons", "context shuffled"):
        assert section in md
    per_gene = _rows(out / "evaluation_genes.csv")
    assert len([r for r in per_gene if r["model"] == "rep"]) == len(genes)
    png = out / "scatter_rep_vs_rep_context_shuffled_16um.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("magnet-evaluate")
    (run,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'test-paired'")
    paired = next(r for r in _rows(out / "evaluation_paired.csv") if r["b"] == SHUFFLED and r["group"] == "all")
    key = "paired/rep_vs_rep_context_shuffled/16um/all/delta"
    assert run.data.metrics[key] == pytest.approx(float(paired["delta"]))
    assert "rep/16um/group/all/pcc_gene" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/evaluation_paired.csv", "evaluation/evaluation_groups.csv", f"evaluation/{png.name}"} <= names


def test_context_controls_rewrite_only_the_context_features(registered, tiny_cohort, tiny_shards):
    """Zero: both feature tensors 0, the rest of the batch untouched; shuffle: every tile's features come from
    one other tile of the slide (a permutation), the same wherever the tile appears."""
    from magnet.config import load_config
    from magnet.predict.config import PredictConfig
    from magnet.predict.model import load_model
    from magnet.predict.slide import predict_slide

    uri, run_dir = registered
    model = load_model(str(run_dir / "model"), uri)
    slide = next(s for s, split in _splits(tiny_shards).items() if split != "train")
    batches = {}
    for context in ("keep", "zero", "shuffle"):
        cfg = load_config(PredictConfig, None, [f"context={context}", "progress=false", "max_bins=100000"])
        batches[context] = []
        predict_slide(model, tiny_cohort / slide / f"{slide}_fullres.tif", 16, cfg,
                      spaceranger=tiny_cohort / slide / "outs", slide=slide, samples_out=batches[context])
    keep, zero, shuf = (b[0][0] for b in (batches["keep"], batches["zero"], batches["shuffle"]))
    assert not zero.spot_feat.any() and not zero.glob_feat.any()
    assert keep.glob_feat.abs().sum() > 0
    for name in ("bin_img", "ctx_glob", "ctx_spot", "glob_pos", "spot_mask", "bin_edge_index"):
        assert (getattr(zero, name) == getattr(keep, name)).all() and (getattr(shuf, name) == getattr(keep, name)).all()

    def by_tile(kind: str) -> dict:
        """Global position (um, rounded) -> (global feature, spot features) over every batch of the slide."""
        out = {}
        for batch, _ in batches[kind]:
            spot = batch.spot_feat.numpy().reshape(batch.num_globals, -1, batch.spot_feat.shape[1])
            for p, f, s, m in zip(batch.glob_pos.numpy(), batch.glob_feat.numpy(), spot, batch.glob_mask.numpy()):
                if m:
                    key = tuple(np.round(p, 1))
                    assert key not in out or np.array_equal(out[key][0], f)  # a tile gets one source everywhere
                    out[key] = (f, s)
        return out

    orig, moved = by_tile("keep"), by_tile("shuffle")
    assert set(orig) == set(moved) and len(orig) > 2
    sources = []
    for key, (f, s) in moved.items():
        src = [k for k, (g, _) in orig.items() if np.array_equal(g, f)]
        assert len(src) == 1 and np.array_equal(orig[src[0]][1], s)  # spot features travel with their tile
        sources.append(src[0])
    assert sorted(sources) == sorted(orig)  # a permutation of the slide's tiles
    assert any(src != key for src, key in zip(sources, moved))


def test_bad_gene_groups_file_is_one_line_error(registered, tiny_cohort, tiny_shards, tmp_path, capsys):
    _, run_dir = registered
    held = [s for s, split in _splits(tiny_shards).items() if split != "train"]
    bad = tmp_path / "groups.csv"
    bad.write_text("gene,grp\nTUM01,marker\n")
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(run_dir / "model"), "--samplesheet", str(_sheet(tiny_cohort, tmp_path, held)),
                 "--gene-groups", str(bad), "--out", str(out), "mlflow=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"magnet: error: {bad}: group: column missing (header: gene,grp; expected gene,group)"]
    assert not out.exists()


def test_a_label_with_the_replicate_mark_is_refused(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", "a#1=runs/x/model", "--samplesheet", str(tmp_path / "s.csv"),
                 "--out", str(out), "mlflow=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["magnet: error: a#1=runs/x/model: --model: a label holds neither '#' nor '(' (they mark "
                   "replicates and controls)"]
    assert not out.exists()

"""`magnet predict`: a tiny model trained and registered once (conftest `registered`, sqlite MLflow),
then slides of `tiny_cohort` predicted through the CLI: Space Ranger and image-only input, the AnnData
layout scanpy expects, equality with the registered model on the shards' own samples, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from magnet.cli import main

REPO = Path(__file__).resolve().parents[1]
SLIDE = "synth_000"


def _slide(cohort: Path, name: str = SLIDE) -> tuple[Path, Path]:
    return cohort / name / "outs", cohort / name / f"{name}_fullres.tif"


def _positions(outs: Path):
    import pandas as pd

    return pd.read_parquet(outs / "binned_outputs/square_016um/spatial/tissue_positions.parquet").set_index("barcode")


@pytest.fixture(scope="module")
def predicted(registered, tiny_cohort, tmp_path_factory):
    """The CLI in a fresh process, model pulled from the registry by alias."""
    uri, _ = registered
    outs, image = _slide(tiny_cohort)
    out = tmp_path_factory.mktemp("pred")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "magnet", "predict", "--model", "models:/tiny@champion",
                           "--tracking-uri", uri, "--spaceranger", str(outs), "--image", str(image), "--bin-um", "16",
                           "--out", str(out / "pred.h5ad"), "--genes", "TUM08,HK001", "--maps", str(out / "maps"),
                           "batch_size=1", "max_bins=100000", "progress=false"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1])


def test_spaceranger_prediction_matches_the_bins(predicted, registered, tiny_cohort):
    import anndata as ad
    import scipy.sparse as sp

    out, summary = predicted
    adata = ad.read_h5ad(out / "pred.h5ad")
    _, run_dir = registered
    genes = json.loads((run_dir / "model" / "model_meta.json").read_text())["genes"]
    pos = _positions(_slide(tiny_cohort)[0])
    tissue = pos[pos["in_tissue"] == 1]
    assert adata.shape == (len(tissue), len(genes)) == (summary["bins"], summary["genes"])
    assert list(adata.var_names) == genes and adata.var["gene_ids"].notna().all()
    assert set(adata.obs_names) == set(tissue.index)
    ref = tissue.loc[adata.obs_names]
    np.testing.assert_array_equal(adata.obs["array_row"], ref["array_row"])
    np.testing.assert_array_equal(adata.obs["array_col"], ref["array_col"])
    np.testing.assert_allclose(adata.obsm["spatial"], ref[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy())
    assert np.isfinite(adata.X).all() and adata.X.std(0).max() > 0
    measured = adata.layers["measured"]
    assert sp.issparse(measured) and measured.shape == adata.shape and measured.max() > 0
    assert adata.uns["magnet"]["units"]["method"] == "log1p_libsize"
    assert adata.uns["magnet"]["model"]["version"] == "1"
    spot, glob = adata.uns["magnet"]["spot"], adata.uns["magnet"]["global"]
    assert spot["X"].shape[1] == glob["X"].shape[1] == len(genes)
    assert adata.obs["magnet_spot"].max() < len(spot["X"]) and adata.obs["magnet_tile"].max() < len(glob["X"])
    assert np.isfinite(spot["X"][spot["tissue"]]).all()
    for g in ("TUM08", "HK001"):
        assert (out / "maps" / f"{g}.png").stat().st_size > 5000
    assert (out / "pred.config.yaml").is_file()


def test_scanpy_draws_a_gene(predicted, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import anndata as ad
    import matplotlib.pyplot as plt
    import scanpy as sc
    from PIL import Image

    out, _ = predicted
    adata = ad.read_h5ad(out / "pred.h5ad")
    sc.pl.spatial(adata, color="TUM08", img_key="hires", show=False)
    png = tmp_path / "spatial.png"
    plt.savefig(png, dpi=80)
    plt.close("all")
    pixels = np.asarray(Image.open(png).convert("RGB")).astype(float)
    assert png.stat().st_size > 10_000 and pixels.std() > 20


def test_predictions_equal_the_registered_model_on_the_shards_samples(predicted, registered, tiny_shards):
    """The shards' own samples of the slide, through the registry model's predict_batch, give the h5ad's values."""
    import anndata as ad
    import mlflow

    from magnet.batch import collate
    from magnet.data.pipeline import ShardSet

    uri, _ = registered
    mlflow.set_tracking_uri(uri)
    pm = mlflow.pyfunc.load_model("models:/tiny@champion").unwrap_python_model()
    man = json.loads((tiny_shards / "16um" / "manifest.json").read_text())
    urls = [str(tiny_shards / "16um" / s["name"]) for s in man["shards"]]
    decoded = list(ShardSet(str(tiny_shards), 16, None, None).reader("fail").read(urls))
    mine = [s for s in decoded if s.meta.slide == SLIDE]
    assert len(mine) >= 4
    adata = ad.read_h5ad(predicted[0] / "pred.h5ad")
    row = {(r, c): i for i, (r, c) in enumerate(zip(adata.obs["array_row"], adata.obs["array_col"]))}
    m = pm.config.model
    for s in mine[:6]:
        out = pm.predict_batch(collate([s], pm.geometry, k_bin=m.k_bin, k_spot=m.k_spot, k_global=m.k_global))
        idx = [row[tuple(rc)] for rc in s["bin_rc"].tolist()]
        np.testing.assert_allclose(adata.X[idx], out["bin"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(adata.layers["measured"][idx].toarray(), s["bin_expr"].astype(np.float32),
                                   atol=1e-6)


def test_image_only_lays_bins_over_tissue(registered, tiny_cohort, tmp_path):
    import anndata as ad
    from scipy.spatial import cKDTree

    _, run_dir = registered
    outs, image = _slide(tiny_cohort, "synth_001")
    assert main(["predict", "--model", str(run_dir / "model"), "--image", str(image), "--mpp", "0.5",
                 "--out", str(tmp_path / "img.h5ad"), "progress=false"]) == 0
    adata = ad.read_h5ad(tmp_path / "img.h5ad")
    pos = _positions(outs)
    tissue = pos[pos["in_tissue"] == 1][["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    grid_bins = (768 // 32) ** 2
    assert 0.3 * len(tissue) < adata.n_obs < grid_bins  # background left out
    dist, _ = cKDTree(tissue).query(adata.obsm["spatial"])
    assert np.mean(dist <= 32) > 0.9  # within one 16 um bin of a Space Ranger tissue bin
    assert "measured" not in adata.layers and adata.uns["magnet"]["grid"] == "tissue_detection"
    assert adata.uns["spatial"]["synth_001_fullres"]["images"]["hires"].shape[2] == 3
    assert np.isfinite(adata.X).all()


def _fails(argv: list[str], capsys, out: Path, expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("magnet: error: ") and expect in err[0], err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err[0]


def test_unknown_registry_name_is_refused(registered, tiny_cohort, tmp_path, capsys):
    uri, _ = registered
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    _fails(["predict", "--model", "models:/nope@champion", "--tracking-uri", uri, "--spaceranger", str(outs),
            "--image", str(image), "--out", str(out)], capsys, out, "models:/nope@champion")


def test_image_of_another_size_is_refused(registered, tiny_cohort, tmp_path, capsys):
    import tifffile

    _, run_dir = registered
    outs, image = _slide(tiny_cohort)
    small = tmp_path / "small.tif"
    tifffile.imwrite(small, tifffile.imread(image)[:600, :600])
    out = tmp_path / "p.h5ad"
    _fails(["predict", "--model", str(run_dir / "model"), "--spaceranger", str(outs), "--image", str(small),
            "--out", str(out)], capsys, out, "image size")


def test_image_of_another_slide_is_refused(registered, tiny_cohort, tmp_path, capsys):
    """One slide's outs/ with another slide's image (same size) predicted noise with exit 0."""
    _, run_dir = registered
    outs, _ = _slide(tiny_cohort)
    _, other = _slide(tiny_cohort, "synth_001")
    out = tmp_path / "p.h5ad"
    _fails(["predict", "--model", str(run_dir / "model"), "--spaceranger", str(outs), "--image", str(other),
            "--out", str(out)], capsys, out, f"{other}: image: does not look like")


def test_gene_the_model_lacks_is_refused(registered, tiny_cohort, tmp_path, capsys):
    _, run_dir = registered
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    _fails(["predict", "--model", str(run_dir / "model"), "--spaceranger", str(outs), "--image", str(image),
            "--out", str(out), "--genes", "TUM08,NOTAGENE", "--maps", str(tmp_path / "maps")], capsys, out,
           "'NOTAGENE' is not among the model's")
    assert not (tmp_path / "maps").exists()


@pytest.mark.parametrize("damage", ["shape", "missing"])
def test_weights_that_do_not_fit_the_config_are_refused(registered, tiny_cohort, tmp_path, capsys, damage):
    """A model folder whose model.safetensors was saved from another architecture: one line, no traceback."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from magnet.format.tar import sha256_file

    _, run_dir = registered
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    state = load_file(model / "model.safetensors")
    name = next(k for k, v in state.items() if v.ndim == 2)
    if damage == "shape":
        state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    else:
        del state[name]
    save_file(state, model / "model.safetensors")
    meta = json.loads((model / "model_meta.json").read_text())  # written so, not damaged: its checksum agrees
    meta["weights_sha256"] = sha256_file(model / "model.safetensors")
    (model / "model_meta.json").write_text(json.dumps(meta))
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    err = _fails(["predict", "--model", str(model), "--spaceranger", str(outs), "--image", str(image),
                  "--out", str(out)], capsys, out, f"{model.resolve()}: weights: ")
    assert name in err


def test_model_trained_on_another_shard_format_is_refused(registered, tiny_cohort, tmp_path, capsys):
    """Format 1 shards held uncentred features; prediction now computes centred ones: one line, no output."""
    import shutil

    _, run_dir = registered
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    meta_path = next(model.rglob("model_meta.json"))
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    _fails(["predict", "--model", str(model), "--spaceranger", str(outs), "--image", str(image), "--out", str(out)],
           capsys, out, "format_version: the model was trained on shards of format 1")


def test_terminated_prediction_leaves_no_temporary_file(registered, tiny_cohort, tmp_path):
    """SIGTERM (a scheduler's kill) while the .h5ad is being written: exit 143, neither output nor temp file."""
    import signal
    import time

    uri, _ = registered
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "magnet", "predict", "--model", "models:/tiny@champion",
                                 "--tracking-uri", uri, "--spaceranger", str(outs), "--image", str(image),
                                 "--out", str(out), "progress=false"],
                                env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=(tmp_path.parent / "terminated.err").open("w"))
        while proc.poll() is None and not list(tmp_path.glob(".p.h5ad.*.tmp")):
            time.sleep(0.01)
        # held where it is, so that the check and the SIGTERM meet the same state: on a loaded machine this
        # process can lose the CPU long enough for the prediction to finish in between (then it runs again)
        if proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)
            if list(tmp_path.glob(".p.h5ad.*.tmp")):
                break
            proc.send_signal(signal.SIGCONT)
        assert proc.wait(timeout=120) == 0, (tmp_path.parent / "terminated.err").read_text()[-2000:]
        for p in tmp_path.iterdir():
            p.unlink()
    else:
        pytest.fail("3 times, the prediction finished writing before it could be held")
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait(timeout=120) == 143, (tmp_path.parent / "terminated.err").read_text()[-2000:]
    assert not out.exists() and not list(tmp_path.iterdir())


def _peak_rss_mb(argv: list[str]) -> tuple[int, float, str]:
    """Exit status, peak resident memory (MB) and stderr of ``magnet ARGV`` in a fresh process."""
    err = Path(os.environ.get("TMPDIR", "/tmp")) / f"magnet-rss-{os.getpid()}.err"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "magnet", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=f, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    text = err.read_text()
    err.unlink()
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss / 1024, text


def _image_only(registered, tiny_cohort) -> list[str]:
    _, run_dir = registered
    _, image = _slide(tiny_cohort, "synth_001")
    return ["predict", "--model", str(run_dir / "model"), "--image", str(image), "progress=false"]


@pytest.fixture(scope="module")
def correct_rss_mb(registered, tiny_cohort, tmp_path_factory) -> float:
    rc, mb, err = _peak_rss_mb([*_image_only(registered, tiny_cohort), "--mpp", "0.5",
                                "--out", str(tmp_path_factory.mktemp("rss") / "good.h5ad")])
    assert rc == 0, err[-2000:]
    return mb


@pytest.mark.parametrize("typo", [["--mpp", "50"], ["--mpp", "5000"], ["--mpp", "0.5", "--bin-um", "160"]])
def test_mistyped_size_is_refused_before_memory_grows(registered, tiny_cohort, correct_rss_mb, tmp_path, typo):
    """--mpp 50 for 0.50 grew a prediction to 24 GB: the pixel size and the bin size are checked against the image and
    the model before anything is allocated, so a typo costs no more memory than the correct run (here far less)."""
    out = tmp_path / "typo.h5ad"
    rc, typo_mb, err = _peak_rss_mb([*_image_only(registered, tiny_cohort), *typo, "--out", str(out)])
    lines = [line for line in err.splitlines() if line.startswith("magnet: error: ")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert ("--mpp" in lines[0] and "mistyped" in lines[0]) if typo[1] != "0.5" else "--bin-um" in lines[0]
    assert typo_mb <= 2 * correct_rss_mb, (typo_mb, correct_rss_mb)
    assert not out.exists() and not list(tmp_path.glob(".typo.h5ad*"))


def test_killed_prediction_is_cleaned_by_the_next_run_and_outputs_need_overwrite(registered, tiny_cohort, tmp_path,
                                                                                capsys):
    """SIGKILL cannot be caught: the temporary .h5ad stays, named with the dead writer's pid and host, and the next
    run for the same --out removes it (a live writer's is kept). Then the output exists: a re-run is refused in
    one line before the model is loaded, and --overwrite replaces it."""
    import signal
    import socket
    import time

    from magnet.io import tmp_name

    uri, _ = registered
    outs, image = _slide(tiny_cohort)
    out = tmp_path / "p.h5ad"
    argv = ["predict", "--model", "models:/tiny@champion", "--tracking-uri", uri, "--spaceranger", str(outs),
            "--image", str(image), "--out", str(out), "progress=false"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([sys.executable, "-m", "magnet", *argv], env={**env, "OMP_NUM_THREADS": "1"}, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(tmp_path.glob(".p.h5ad.magnet-tmp-*")):
        time.sleep(0.01)
    assert proc.poll() is None, "prediction ended before its temporary file was seen"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    (stale,) = tmp_path.glob(".p.h5ad.magnet-tmp-*")
    assert f"-{proc.pid}-{socket.gethostname()}-" in stale.name and not out.exists()
    live = tmp_path / tmp_name("p.h5ad")  # a writer still running (this process) keeps its temporary file
    live.write_bytes(b"")

    assert main(argv) == 0
    assert out.is_file() and not stale.exists() and live.exists()
    live.unlink()
    capsys.readouterr()
    written = (out.stat().st_mtime_ns, out.read_bytes())
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"magnet: error: {out}: --out: exists; pass --overwrite to replace it"]
    assert (out.stat().st_mtime_ns, out.read_bytes()) == written
    assert main([*argv, "--overwrite"]) == 0
    assert out.stat().st_mtime_ns != written[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.config.yaml", "p.h5ad"]

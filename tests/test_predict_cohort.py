"""`magnet predict --samplesheet`: a 3-slide cohort on a real local Ray (2 CPUs, 100 MB object store), model
from the sqlite MLflow registry, one slide's image broken; then the slide fixed and the command re-run (a killed
run's temporary file removed), then re-run with --overwrite (every slide predicted again)."""

from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from magnet.cli import main
from magnet.io import tmp_name

REPO = Path(__file__).resolve().parents[1]
SLIDES = ("synth_000", "synth_001", "synth_002")


def _cohort_cmd(uri: str, sheet: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "magnet", "predict", "--model", "models:/tiny@champion", "--tracking-uri", uri,
            "--samplesheet", str(sheet), "--out", str(out), "cohort.num_cpus=2", "cohort.object_store_mb=100",
            "progress=false"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _summary(out: Path) -> dict[str, dict]:
    with (out / "summary.csv").open() as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


def _assert_same_h5ad(a: Path, b: Path) -> None:
    """Same matrices, annotations and uns, apart from the timings in uns['magnet']['seconds']."""
    import anndata as ad
    import pandas as pd

    x, y = ad.read_h5ad(a), ad.read_h5ad(b)
    np.testing.assert_array_equal(x.X, y.X)
    pd.testing.assert_frame_equal(x.obs, y.obs)
    pd.testing.assert_frame_equal(x.var, y.var)
    np.testing.assert_array_equal(x.obsm["spatial"], y.obsm["spatial"])
    assert (x.layers["measured"] != y.layers["measured"]).nnz == 0
    for u in (x.uns, y.uns):
        u["magnet"].pop("seconds")

    def same(p, q, where):
        assert type(p) is type(q) or (np.isscalar(p) and np.isscalar(q)), where
        if isinstance(p, dict):
            assert p.keys() == q.keys(), where
            for k in p:
                same(p[k], q[k], f"{where}/{k}")
        else:
            np.testing.assert_array_equal(p, q, err_msg=where)

    same(x.uns, y.uns, "uns")


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_cohort_with_a_broken_slide_then_resumed(registered, tiny_cohort, tmp_path):
    uri, _ = registered
    broken = tmp_path / "broken_fullres.tif"
    broken.write_bytes(b"II*\x00 this is not a TIFF")
    sheet = tmp_path / "cohort.csv"
    rows = [f"{s},{tiny_cohort / s / 'outs'},{tiny_cohort / s / f'{s}_fullres.tif'}" for s in SLIDES[:2]]
    rows.append(f"{SLIDES[2]},{tiny_cohort / SLIDES[2] / 'outs'},{broken}")
    sheet.write_text("slide,spaceranger,image\n" + "\n".join(rows) + "\n")
    out = tmp_path / "preds"

    first = _run(_cohort_cmd(uri, sheet, out))
    assert first.returncode == 2, first.stderr[-3000:]
    err = first.stderr.strip().splitlines()[-1]
    assert err.startswith("magnet: error: ") and "1 of 3 slides failed: synth_002 (" in err
    assert str(broken) in err and "image" in err
    summary = _summary(out)
    assert [summary[s]["status"] for s in SLIDES] == ["predicted", "predicted", "failed"]
    assert "not a readable TIFF" in summary["synth_002"]["error"] and summary["synth_002"]["bins"] == "0"
    assert sorted(p.name for p in out.glob("*.h5ad")) == ["synth_000.h5ad", "synth_001.h5ad"]
    assert not list(out.glob(".*"))

    for s in SLIDES[:2]:  # the single-slide command on the same slide, same threads: the same file
        single = tmp_path / "single" / f"{s}.h5ad"
        assert main(["predict", "--model", "models:/tiny@champion", "--tracking-uri", uri, "--spaceranger",
                     str(tiny_cohort / s / "outs"), "--image", str(tiny_cohort / s / f"{s}_fullres.tif"),
                     "--slide", s, "--out", str(single), "threads=1", "progress=false"]) == 0
        _assert_same_h5ad(out / f"{s}.h5ad", single)
        assert int(summary[s]["bins"]) > 0 and float(summary[s]["seconds"]) > 0

    before = {s: (_sha(out / f"{s}.h5ad"), (out / f"{s}.h5ad").stat().st_mtime_ns) for s in SLIDES[:2]}
    broken.write_bytes((tiny_cohort / SLIDES[2] / f"{SLIDES[2]}_fullres.tif").read_bytes())  # fixed
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = out / tmp_name(f"{SLIDES[2]}.h5ad").replace(f"-{os.getpid()}-", f"-{dead.pid}-")  # a killed run's
    stale.write_bytes(b"half a file")
    second = _run(_cohort_cmd(uri, sheet, out))
    assert second.returncode == 0, second.stderr[-3000:]
    assert not stale.exists()
    assert "2 of 3 slides already done, 1 to do" in second.stderr
    summary = _summary(out)
    assert [summary[s]["status"] for s in SLIDES] == ["skipped", "skipped", "predicted"]
    assert int(summary["synth_002"]["bins"]) > 0 and summary["synth_002"]["error"] == ""
    assert {s: (_sha(out / f"{s}.h5ad"), (out / f"{s}.h5ad").stat().st_mtime_ns) for s in SLIDES[:2]} == before
    assert (out / "synth_002.h5ad").is_file()

    written = {s: (out / f"{s}.h5ad").stat().st_mtime_ns for s in SLIDES}
    third = _run(_cohort_cmd(uri, sheet, out) + ["--overwrite"])  # every slide again, each file replaced
    assert third.returncode == 0, third.stderr[-3000:]
    assert "--overwrite: every slide predicted again" in third.stderr
    assert [_summary(out)[s]["status"] for s in SLIDES] == ["predicted"] * 3
    assert all((out / f"{s}.h5ad").stat().st_mtime_ns != written[s] for s in SLIDES)
    _assert_same_h5ad(out / f"{SLIDES[0]}.h5ad", tmp_path / "single" / f"{SLIDES[0]}.h5ad")
    assert not list(out.glob(".*"))


def test_cohort_arguments_are_checked(registered, tiny_cohort, tmp_path, capsys):
    uri, _ = registered
    sheet = tmp_path / "s.csv"
    sheet.write_text("slide,spaceranger,image\n")
    base = ["predict", "--model", "models:/tiny@champion", "--tracking-uri", uri, "--out", str(tmp_path / "o")]
    assert main(base + ["--samplesheet", str(sheet), "--image", "x.tif"]) == 2
    assert "--image: not used with --samplesheet" in capsys.readouterr().err
    assert main(base + ["--samplesheet", str(sheet)]) == 2
    assert f"{sheet}: no slides listed" in capsys.readouterr().err
    assert main(base + ["--image", str(tiny_cohort / "synth_000" / "synth_000_fullres.tif"), "--mpp", "0.5",
                        "--address", "auto"]) == 2
    assert "--address: only with --samplesheet" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

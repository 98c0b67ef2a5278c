"""Commands beside a Ray cluster started separately (``ray start --head``, its own temporary folder): a cohort
predicted on it with ``--address`` and the tracking URI only in the environment, a relative sqlite path, the
samplesheet and --out relative too (the workers run in the cluster's folder, with its environment): every
slide predicted; and ``magnet shard`` without --address, which must start its own Ray instance, not join the
running cluster. The cluster is stopped through its own process (``ray start --block``): ``ray stop`` would
stop every Ray instance of the machine."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """(address, environment of a process on this machine that sees the cluster as its running one)."""
    tmp = Path(tempfile.mkdtemp(prefix="magnet-ray-"))  # short: Ray's socket paths live under it
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="disabled", TMPDIR=str(tmp), PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
           "--object-store-memory=80000000", "--include-dashboard=false", "--disable-usage-stats", "--block"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        current = tmp / "ray" / "ray_current_cluster"
        deadline = time.monotonic() + 180
        while not current.is_file():
            if proc.poll() is not None:
                pytest.fail(f"ray start exited: {proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "the Ray cluster did not start within 180 s"
            time.sleep(1)
        yield f"127.0.0.1:{port}", env
    finally:
        proc.terminate()  # ray start --block drains and stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows(path: Path) -> dict[str, dict]:
    with path.open() as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


@pytest.mark.slow
def test_cohort_on_a_cluster_gets_the_drivers_tracking_uri_and_paths(ray_cluster, registered, tiny_cohort, tmp_path):
    address, env = ray_cluster
    uri, _ = registered
    db = Path(uri[len("sqlite:///"):])
    cwd = db.parent  # the tracking URI is relative to it, and only in the environment
    sheet = tmp_path / "one.csv"
    s = "synth_000"
    sheet.write_text("slide,spaceranger,image\n"
                     f"{s},{os.path.relpath(tiny_cohort / s / 'outs', tmp_path)},"
                     f"{os.path.relpath(tiny_cohort / s / f'{s}_fullres.tif', tmp_path)}\n")
    out = os.path.relpath(tmp_path / "preds", cwd)
    cmd = [sys.executable, "-m", "magnet", "predict", "--model", "models:/tiny@champion", "--samplesheet",
           os.path.relpath(sheet, cwd), "--out", out, "--address", address, "progress=false"]
    proc = subprocess.run(cmd, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{db.name}"}, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _rows(tmp_path / "preds" / "summary.csv")
    assert rows[s]["status"] == "predicted" and int(rows[s]["bins"]) > 0, rows
    assert (tmp_path / "preds" / f"{s}.h5ad").is_file()


@pytest.mark.slow
def test_shard_without_address_starts_its_own_ray_beside_a_running_cluster(ray_cluster, tiny_cohort, tmp_path):
    _, env = ray_cluster
    sheet = tmp_path / "two.csv"
    sheet.write_text("slide,spaceranger,image\n" + "".join(
        f"{s},{tiny_cohort / s / 'outs'},{tiny_cohort / s / f'{s}_fullres.tif'}\n" for s in ("synth_000", "synth_001")))
    cmd = [sys.executable, "-m", "magnet", "shard", "--samplesheet", str(sheet), "--bin-um", "16", "--out",
           str(tmp_path / "shards"), "--config", str(REPO / "configs/shard/tiny.yaml"), "split.val_frac=0.5"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Started a local Ray instance" in proc.stderr
    assert (tmp_path / "shards" / "16um" / "manifest.json").is_file()

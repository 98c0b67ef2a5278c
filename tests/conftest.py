"""Shared fixtures. ``tiny_cohort``: a synthetic cohort (configs/synth/tiny.yaml) made once per session;
``tiny_shards``: its shards; ``registered``: a tiny model trained on them and registered in MLflow."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from magnet.cli import main

REPO = Path(__file__).resolve().parents[1]


def train_env(**extra: str) -> dict:
    """Environment of a training (DeepSpeed) subprocess: no inherited rank, rendezvous or MLflow variables,
    one thread, and one TORCH_EXTENSIONS_DIR under build/ for every test, so DeepSpeed's shm op compiles
    once (torch guards each op's build with an OS advisory lock on <op>/lock, released by the kernel if
    a builder is killed, so a leftover lock file is harmless); ``extra`` is added."""
    ext = REPO / "build" / "torch_extensions"
    ext.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")}
    env.update(TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """Folder holding ``samplesheet.csv``, ``config.yaml`` and 3 slides of 384 um (``synth_000``...)."""
    out = tmp_path_factory.mktemp("synth") / "tiny"
    assert main(["synth", "--config", str(REPO / "configs/synth/tiny.yaml"), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_shards(tiny_cohort, tmp_path_factory) -> Path:
    """``magnet shard`` of ``tiny_cohort`` at 8 and 16 um (configs/shard/tiny.yaml): folder with ``8um/``, ``16um/``."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    argv = ["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "8", "16",
            "--out", str(out), "--config", str(REPO / "configs/shard/tiny.yaml")]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="session")
def registered(tiny_shards, tmp_path_factory):
    """(tracking URI, run folder) of `tiny@champion`, trained 2 steps at 16 um (one plain DeepSpeed process)."""
    out = tmp_path_factory.mktemp("predict_model")
    uri = f"sqlite:///{out}/mlruns.db"
    cmd = [sys.executable, "launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"),
           f"data.shards={tiny_shards}", f"train.out_dir={out}", "train.run_name=m", "train.steps=2",
           "train.deepspeed=zero1", "mlflow.enabled=true", f"mlflow.tracking_uri={uri}",
           "mlflow.register_as=tiny", "mlflow.alias=champion"]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return uri, out / "m"


@pytest.fixture(scope="session")
def feature_shards(tiny_cohort, tmp_path_factory) -> Path:
    """``magnet shard`` of ``tiny_cohort`` at 16 um with cached bin features (``encoder.bin_features=true``),
    in the command's own process (``ray.num_cpus=1``): folder with ``16um/``."""
    out = tmp_path_factory.mktemp("feature_shards") / "tiny"
    argv = ["shard", "--samplesheet", str(tiny_cohort / "samplesheet.csv"), "--bin-um", "16", "--out", str(out),
            "--config", str(REPO / "configs/shard/tiny.yaml"), "encoder.bin_features=true", "ray.num_cpus=1"]
    assert main(argv) == 0
    return out

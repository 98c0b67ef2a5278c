"""Shared fixtures. ``tiny_cohort``: a synthetic cohort (configs/synth/tiny.yaml) made once per session."""

from pathlib import Path

import pytest

from magnet.cli import main

REPO = Path(__file__).resolve().parents[1]


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

"""bench/bench_shard.py on a small slide at one bin size: the figures are printed, consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import train_env

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_small_run_prints_consistent_figures(tmp_path):
    cmd = [sys.executable, "bench/bench_shard.py", "--size-um", "400", "--slides", "2", "--bin-um", "16",
           "--workdir", str(tmp_path / "work"), "--set", "encoder.batch_size=4"]
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(RAY_AUTH_MODE="disabled"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["overrides"] == ["encoder.batch_size=4"]  # reached magnet shard:
    assert json.loads((tmp_path / "work/one16/16um/manifest.json").read_text())["config"]["encoder"]["batch_size"] == 4
    fig = res["16um"]
    assert fig["bins"] > 100 and fig["one_slide"]["bins"] == fig["bins"]  # both writers see the same tissue bins
    one = fig["one_slide"]
    assert one["ratio_wall"] == pytest.approx(fig["naive"]["wall"] / one["wall"])
    assert one["ratio_cpu"] == pytest.approx(fig["naive"]["cpu"] / one["cpu"])
    seconds = dict(one["seconds"])
    phases = seconds.pop("slide_phases")
    assert 0 < sum(seconds.values()) < one["wall"] and phases["features"] > 0 and phases["encoder_build"] > 0
    assert sum(phases.values()) <= seconds["slides"] + 0.5
    cohort = json.loads((tmp_path / "work/cohort16/16um/manifest.json").read_text())["slides"]
    assert fig["cohort_slide"]["bins"] == cohort["synth_001"]["bins"]  # the slides after the first one's
    assert "16 um in one call" not in proc.stdout
    assert not (tmp_path / "work" / "naive16").exists()  # its PNGs are removed

"""A decompression bomb in a shard (a member of a few KB whose zstd frame declares and expands to 1.5 GiB,
with a manifest that agrees): `magnet shard validate` and the training stream refuse it in one line (or
count it under data.on_corrupt=skip) with peak memory close to that of the clean shards, measured as
the peak RSS of a subprocess against the clean run in the same test."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shard_damage import bomb, rehash

REPO = Path(__file__).resolve().parents[1]
SHARD = "train-000000.tar"
DECLARED = 3 << 29  # 1.5 GiB
# runs argv, then prints its exit status, stderr and peak RSS (kB) as JSON
PEAK = ("import json, resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "print(json.dumps({'rc': p.returncode, 'err': p.stderr, 'out': p.stdout, "
        "'kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
TRAIN = """import sys
from magnet.data.pipeline import ShardSet, TrainStream
from magnet.dist import WorldInfo
from magnet.errors import UserError
from magnet.train_config import DataConfig
cfg = DataConfig(shards=sys.argv[1], bin_um=16, micro_batch=2, max_bins=8, shuffle_buffer=4, shuffle_initial=2,
                 workers=0, on_corrupt=sys.argv[2])
stream = TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, WorldInfo(0, 1, 0), 0,
                     {"k_bin": 4, "k_spot": 3, "k_global": 3})
try:
    print(sum(b.corrupt_samples for b in stream.epoch(0)))
except UserError as e:
    sys.exit(f"magnet: error: {e}")
"""


def _peak(*argv: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.fixture()
def clean_and_bomb(tiny_shards, tmp_path) -> tuple[Path, Path]:
    clean, bad = tmp_path / "clean", tmp_path / "bomb"
    for root in (clean, bad):
        shutil.copytree(tiny_shards / "16um", root / "16um")
    bomb(bad / "16um" / SHARD, DECLARED)
    rehash(bad / "16um", SHARD)
    assert (bad / "16um" / SHARD).stat().st_size < (clean / "16um" / SHARD).stat().st_size + (1 << 20)
    return clean, bad


@pytest.mark.slow
def test_shard_validate_refuses_a_bomb_in_bounded_memory(clean_and_bomb):
    clean, bad = clean_and_bomb
    ok = _peak(sys.executable, "-m", "magnet", "shard", "validate", str(clean / "16um"))
    got = _peak(sys.executable, "-m", "magnet", "shard", "validate", str(bad / "16um"))
    assert ok["rc"] == 0, ok["err"]
    print(f"shard validate peak RSS: clean {ok['kb']} kB, bomb {got['kb']} kB")
    assert got["kb"] <= 1.5 * ok["kb"]
    err = got["err"].strip()
    assert got["rc"] == 2 and len(err.splitlines()) == 1, err
    assert f"{SHARD}: " in err and "bin_expr.npy.zst: cannot decode" in err and "declares" in err


@pytest.mark.slow
def test_training_stream_refuses_or_skips_a_bomb_in_bounded_memory(clean_and_bomb):
    clean, bad = clean_and_bomb
    ok = _peak(sys.executable, "-c", TRAIN, str(clean), "fail")
    failed = _peak(sys.executable, "-c", TRAIN, str(bad), "fail")
    skipped = _peak(sys.executable, "-c", TRAIN, str(bad), "skip")
    assert ok["rc"] == 0 and ok["out"].strip() == "0", ok["err"]
    print(f"training stream peak RSS: clean {ok['kb']} kB, bomb (fail) {failed['kb']} kB, "
          f"bomb (skip) {skipped['kb']} kB")
    assert max(failed["kb"], skipped["kb"]) <= 1.5 * ok["kb"]
    err = failed["err"].strip()
    assert failed["rc"] == 1 and len(err.splitlines()) == 1, err
    assert f"{SHARD}: " in err and "bin_expr.npy.zst: cannot decode" in err and "data.on_corrupt=fail" in err
    assert skipped["rc"] == 0 and int(skipped["out"]) >= 1, skipped["err"]
    assert "bin_expr.npy.zst: cannot decode" in skipped["err"] and "data.on_corrupt=skip" in skipped["err"]

"""bench/context_truth_features.py: shards whose context features are the true cell-type mix (diagnostic)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from magnet.cli import main
from magnet.format.codec import decode_npy
from test_shard import samples

REPO = Path(__file__).resolve().parents[1]


def test_truth_features_follow_the_cells(tiny_shards, tiny_cohort, tmp_path, capsys):
    out = tmp_path / "truth" / "16um"
    proc = subprocess.run([sys.executable, str(REPO / "bench/context_truth_features.py"), "rewrite", "--shards",
                           str(tiny_shards / "16um"), "--cohort", str(tiny_cohort), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(["shard", "validate", str(out)]) == 0  # sizes and sha256 of the manifest match the new tars
    capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["encoder"]["feat_dim"] == 8
    tum = [i for i, g in enumerate(manifest["genes"]) if g.startswith("TUM")]
    share, expr, n = [], [], 0
    for _, m in samples(out):
        spot, glob = decode_npy(m["spot_feat.npy.zst"]).astype(float), decode_npy(m["global_feat.npy.zst"]).astype(float)
        mask = decode_npy(m["nbr_mask.npy.zst"])
        assert spot.shape[-1] == glob.shape[-1] == 8 and not glob[~mask].any()
        cells = glob[mask][:, 7] > 0
        np.testing.assert_allclose(glob[mask][cells, :7].sum(1), 1.0, atol=2e-3)  # type shares
        share.append(glob[0, 0])
        expr.append(decode_npy(m["global_expr.npy.zst"]).astype(float)[0, tum].mean())
        n += 1
    assert n == sum(s["n_samples"] for s in manifest["shards"])
    assert np.corrcoef(share, expr)[0, 1] > 0.5  # the tumour share of a tile follows its tumour markers


def test_score_prints_each_group_and_the_markers_by_cell_type(tiny_shards, tiny_cohort, registered):
    _, run = registered
    splits = json.loads((tiny_shards / "16um" / "manifest.json").read_text())["splits"]
    split = "val" if "val" in splits.values() else "train"
    proc = subprocess.run([sys.executable, str(REPO / "bench/context_truth_features.py"), "score", "--shards",
                           str(tiny_shards), "--bin-um", "16", "--cohort", str(tiny_cohort), "--split", split,
                           "--by-type", f"tiny={run / 'model'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("tiny "))
    assert "marker(" in lines[0] and all(np.isfinite(float(v)) for v in lines[row].split()[1:])
    assert lines[row + 1].strip().startswith("markers by type: tumour ")

"""2 um end to end on a small synthetic cohort through the real commands: shard at 2 um with raw counts, a
poisson model trained 2 steps, `magnet predict --cells` from Space Ranger 4's segmentation and, on the image
alone, from the segmentation's GeoJSON polygons; `magnet evaluate` at 2 um, pooled to 8 and 16 um, and per cell
against the measured and the expected counts (oracle)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from magnet.cli import main
from tests.conftest import REPO, train_env


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], env=train_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kw)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cells_and_2um_end_to_end(tmp_path):
    cohort, shards, runs = tmp_path / "synth", tmp_path / "shards", tmp_path / "runs"
    assert main(["synth", "--config", str(REPO / "configs/synth/tiny.yaml"), "--out", str(cohort), "--slides", "2",
                 "--size-um", "192"]) == 0
    assert main(["shard", "--samplesheet", str(cohort / "samplesheet.csv"), "--bin-um", "2", "--out", str(shards),
                 "--config", str(REPO / "configs/shard/tiny.yaml"), "shard.keep_counts=true", "split.n_folds=1"]) == 0
    manifest = json.loads((shards / "2um" / "manifest.json").read_text())
    val = next(s for s, split in manifest["splits"].items() if split == "val")
    _run(["launch/train.py", "--config", str(REPO / "configs/train/tiny.yaml"), f"data.shards={shards}",
          "data.bin_um=2", "data.max_bins=256", f"train.out_dir={runs}", "train.run_name=p", "train.steps=2",
          "train.deepspeed=zero1", "loss.bin=poisson", "data.eval_split=test"])  # no test split: no evaluation
    model = runs / "p" / "model"
    outs, image = cohort / val / "outs", cohort / val / f"{val}_fullres.tif"

    # Space Ranger 4's cells: each cell's value is log1p of the mean expm1 of its bins' values
    _run(["-m", "magnet", "predict", "--model", str(model), "--spaceranger", str(outs), "--image", str(image),
          "--out", str(tmp_path / "p.h5ad"), "--cells", "spaceranger", "progress=false"])
    bins, cells = ad.read_h5ad(tmp_path / "p.h5ad"), ad.read_h5ad(tmp_path / "p.cells.h5ad")
    maps = pd.read_parquet(outs / "segmented_outputs/barcode_mappings.parquet").dropna(subset=["cell_id"])
    assert set(cells.obs_names) == set(maps["cell_id"]) and len(cells) > 20
    of_cell = maps.set_index("square_002um")["cell_id"]
    member = of_cell.reindex(bins.obs_names)
    want = pd.DataFrame(np.expm1(bins.X.astype(np.float64)), index=bins.obs_names).groupby(member.to_numpy()).mean()
    np.testing.assert_allclose(cells.X, np.log1p(want.loc[cells.obs_names].to_numpy()), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cells.obs["n_bins"], member.value_counts().loc[cells.obs_names].to_numpy())
    assert list(cells.var_names) == list(bins.var_names) and "rate" in cells.layers
    assert cells.uns["magnet"]["units"]["method"] == "log1p_libsize"

    # an H&E-only slide: the same cells given as polygons, bins from tissue detection
    mpp = json.loads((outs / "spatial/scalefactors_json.json").read_text())["microns_per_pixel"]
    _run(["-m", "magnet", "predict", "--model", str(model), "--image", str(image), "--mpp", str(mpp),
          "--out", str(tmp_path / "he.h5ad"), "--cells", str(outs / "segmented_outputs/cell_segmentations.geojson"),
          "progress=false"])
    he = ad.read_h5ad(tmp_path / "he.cells.h5ad")
    shared = len(set(he.obs_names) & {c.split("_")[1].split("-")[0].lstrip("0") for c in cells.obs_names})
    assert shared > 0.8 * len(cells) and np.isfinite(he.X).all()

    # evaluate at 2 um, pooled to 8 and 16 um, per cell (measured, expected target) and the cell oracle
    sheet = tmp_path / "val.csv"
    sheet.write_text(f"slide,spaceranger,image\n{val},{outs},{image}\n")
    _run(["-m", "magnet", "evaluate", "--model", f"p={model}", "--samplesheet", str(sheet), "--out",
          str(tmp_path / "eval"), "controls=[]", "mlflow=false", "predict.progress=false"])
    with open(tmp_path / "eval" / "evaluation.csv") as f:
        rows = {(r["level"], r["bin_um"], r["model"], r["source"]): r for r in csv.DictReader(f)}
    for key in (("bins", "2", "p", "bin head"), ("bins", "8", "p", "2 um bins pooled"),
                ("bins", "16", "p", "2 um bins pooled"), ("cells", "2", "p", "2 um bins pooled per cell"),
                ("cells", "2", "p", "2 um bins pooled per cell, vs expected target")):
        assert key in rows and np.isfinite(float(rows[key]["pcc_gene"])), key
    oracle = rows[("cells", "2", "oracle", "expected target given true means")]
    assert float(oracle["pcc_gene"]) > float(rows[("cells", "2", "p", "2 um bins pooled per cell")]["pcc_gene"])


def test_bins_find_their_cells_by_row_and_column(tmp_path):
    """Space Ranger 4's barcode mappings read by (row, col), not as strings: each bin gets its cell (ids sorted), a
    bin outside every cell or absent from the mappings -1; a barcode that is not a 2 um one is refused by name."""
    from magnet.errors import UserError
    from magnet.predict.cells import spaceranger_cells

    outs = tmp_path / "outs"
    (outs / "segmented_outputs").mkdir(parents=True)
    mappings = outs / "segmented_outputs" / "barcode_mappings.parquet"
    pd.DataFrame({"square_002um": ["s_002um_00000_00001-1", "s_002um_00003_00002-1", "s_002um_00000_00000-1",
                                   "s_002um_00120_00007-1"],
                  "cell_id": ["cellid_000000002-1", "cellid_000000001-1", None, "cellid_000000002-1"]}
                 ).to_parquet(mappings)
    ids, cell = spaceranger_cells(outs, np.array([[3, 2], [0, 0], [120, 7], [9, 9], [0, 1]]))
    assert list(ids) == ["cellid_000000001-1", "cellid_000000002-1"]
    assert cell.tolist() == [0, -1, 1, -1, 1]
    pd.DataFrame({"square_002um": ["s_002um_00000_00001-1", "s_008um_00000_00000-1"],
                  "cell_id": ["a", "b"]}).to_parquet(mappings)
    with pytest.raises(UserError, match=r"barcode_mappings.parquet: square_002um: 's_008um_00000_00000-1' is not a 2 um"):
        spaceranger_cells(outs, np.array([[0, 1]]))

"""Bad input to ``magnet shard``: a one-line error naming the file and the field, exit 2, no shard.

Each case copies slides of the tiny cohort, breaks one thing, and runs the real CLI.
"""

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tifffile

from magnet.cli import main

REPO = Path(__file__).resolve().parents[1]
BIN8 = Path("outs/binned_outputs/square_008um")


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (the CLI reuses it); most cases fail before Ray is needed."""
    import ray

    ray.init(num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cohort(tiny_cohort: Path, tmp: Path, slides=("synth_000",)) -> Path:
    for s in slides:
        shutil.copytree(tiny_cohort / s, tmp / s)
    rows = [f"{s},{s}/outs,{s}/{s}_fullres.tif" for s in slides]
    (tmp / "slides.csv").write_text("slide,spaceranger,image\n" + "\n".join(rows) + "\n")
    return tmp / "slides.csv"


def edit_h5(path: Path, name: str, fn) -> None:
    with h5py.File(path, "r+") as f:
        data = f[name][:]
        f[name][...] = fn(data)


def edit_parquet(path: Path, fn) -> None:
    pq.write_table(pa.Table.from_pandas(fn(pq.read_table(path).to_pandas()), preserve_index=False), path)


def edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def missing_folder(d):
    shutil.rmtree(d / "synth_000" / "outs")
    return "slides.csv", "spaceranger"


def missing_image(d):
    (d / "synth_000" / "synth_000_fullres.tif").unlink()
    return "slides.csv", "image"


def parquet_column(d):
    edit_parquet(d / "synth_000" / BIN8 / "spatial/tissue_positions.parquet", lambda t: t.drop(columns="pxl_row_in_fullres"))
    return "tissue_positions.parquet", "pxl_row_in_fullres"


def unknown_barcode(d):
    edit_h5(d / "synth_000" / BIN8 / "filtered_feature_bc_matrix.h5", "matrix/barcodes",
            lambda b: np.concatenate([[b"s_999um_99999_9999-1"], b[1:]]).astype(b.dtype))
    return "filtered_feature_bc_matrix.h5", "matrix/barcodes"


def duplicate_barcode(d):
    edit_h5(d / "synth_000" / BIN8 / "filtered_feature_bc_matrix.h5", "matrix/barcodes",
            lambda b: np.concatenate([b[:1], b[:1], b[2:]]))
    return "filtered_feature_bc_matrix.h5", "duplicate"


def outside_image(d):
    def move(t):
        t.loc[t.index[t["in_tissue"] == 1][0], "pxl_col_in_fullres"] = 1e6
        return t

    edit_parquet(d / "synth_000" / BIN8 / "spatial/tissue_positions.parquet", move)
    return "tissue_positions.parquet", "pxl_col_in_fullres"


def inconsistent_mpp(d):
    edit_json(d / "synth_000" / BIN8 / "spatial/scalefactors_json.json", microns_per_pixel=0.8)
    return "scalefactors_json.json", "microns_per_pixel"


def no_tissue(d):
    edit_parquet(d / "synth_000" / BIN8 / "spatial/tissue_positions.parquet", lambda t: t.assign(in_tissue=0))
    return "tissue_positions.parquet", "in_tissue"


def negative_counts(d):
    edit_h5(d / "synth_000" / BIN8 / "filtered_feature_bc_matrix.h5", "matrix/data",
            lambda x: np.where(np.arange(len(x)) == 7, -3, x).astype(x.dtype))
    return "filtered_feature_bc_matrix.h5", "matrix/data"


def nan_counts(d):
    path = d / "synth_000" / BIN8 / "filtered_feature_bc_matrix.h5"
    with h5py.File(path, "r+") as f:
        data = f["matrix/data"][:].astype(np.float32)
        data[3] = np.nan
        del f["matrix/data"]
        f["matrix/data"] = data
    return "filtered_feature_bc_matrix.h5", "matrix/data"


def grayscale(d):
    path = d / "synth_000" / "synth_000_fullres.tif"
    gray = tifffile.imread(path).mean(-1).astype(np.uint8)
    tifffile.imwrite(path, gray, tile=(256, 256))
    return "synth_000_fullres.tif", "grayscale"


def image_of_another_slide(d):
    """Same size, other content (here the slide turned by 180 degrees): the hires image tells them apart."""
    path = d / "synth_000" / "synth_000_fullres.tif"
    tifffile.imwrite(path, tifffile.imread(path)[::-1, ::-1], tile=(256, 256))
    return "synth_000_fullres.tif", "does not look like"


def truncated_h5(d):
    path = d / "synth_000" / BIN8 / "filtered_feature_bc_matrix.h5"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "filtered_feature_bc_matrix.h5", "truncated"


CASES = [missing_folder, missing_image, parquet_column, unknown_barcode, duplicate_barcode, outside_image,
         inconsistent_mpp, no_tissue, negative_counts, nan_counts, grayscale, image_of_another_slide, truncated_h5]


def run_shard(sheet: Path, out: Path, *extra) -> int:
    return main(["shard", "--samplesheet", str(sheet), "--bin-um", "8", "--out", str(out),
                 "--config", str(REPO / "configs/shard/tiny.yaml"), *extra])


def assert_refused(rc, capsys, out: Path, file: str, field: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err and err[-1].startswith("magnet: error: "), err
    assert file in err[-1] and field in err[-1], err[-1]
    assert not list(out.rglob("*.tar")) and not list(out.rglob("manifest.json"))


@pytest.mark.parametrize("breakage", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input(breakage, tiny_cohort, tmp_path, ray_local, capsys):
    sheet = cohort(tiny_cohort, tmp_path)
    file, field = breakage(tmp_path)
    out = tmp_path / "out"
    assert_refused(run_shard(sheet, out), capsys, out, file, field)


def test_gene_file_naming_unknown_genes(tiny_cohort, tmp_path, ray_local, capsys):
    sheet = cohort(tiny_cohort, tmp_path)
    genes = tmp_path / "genes.txt"
    genes.write_text("HK006\nNOT_A_GENE\n")
    out = tmp_path / "out"
    rc = run_shard(sheet, out, "genes.selection=file", f"genes.gene_file={genes}")
    assert_refused(rc, capsys, out, "genes.txt", "NOT_A_GENE")


def test_different_gene_sets(tiny_cohort, tmp_path, ray_local, capsys):
    sheet = cohort(tiny_cohort, tmp_path, slides=("synth_000", "synth_001"))
    edit_h5(tmp_path / "synth_001" / BIN8 / "filtered_feature_bc_matrix.h5", "matrix/features/id",
            lambda ids: np.concatenate([[b"OTHER"], ids[1:]]).astype(ids.dtype))
    out = tmp_path / "out"
    assert_refused(run_shard(sheet, out), capsys, out, "synth_001", "features/id")

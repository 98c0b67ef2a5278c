"""docs/your_slides.md is run as written: its `bash` blocks, in order, on the tiny synthetic cohort (slides laid
out as Space Ranger writes them), with the guide's set-up block (```bash setup) replaced by tiny configs."""

import re
import subprocess
import sys
from pathlib import Path

import anndata
import pytest
import timm
import torch
import yaml

from conftest import train_env

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "your_slides.md"


def _blocks() -> list[tuple[str, str]]:
    """(info string, code) of every fenced block of the guide."""
    return [(m[1].strip(), m[2]) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", GUIDE.read_text(), re.M | re.S)]


def _setup(tmp: Path, cohort: Path) -> dict[str, str]:
    """The guide's variables for the tiny cohort; slides.csv is written into ``tmp``."""
    rows = ["slide,spaceranger,image,split"]
    for slide, split in zip(("synth_000", "synth_001", "synth_002"), ("train", "val", "test")):
        rows.append(f"{slide},{cohort / slide / 'outs'},{cohort / slide / f'{slide}_fullres.tif'},{split}")
    (tmp / "slides.csv").write_text("\n".join(rows) + "\n")
    shard = {**yaml.safe_load((REPO / "configs/shard/tiny.yaml").read_text())}
    shard["ray"] = {**shard["ray"], "num_cpus": 1}  # one process, no Ray start-up
    (tmp / "shard.yaml").write_text(yaml.safe_dump(shard))
    train = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())
    train["train"].update(steps=2, ckpt_every=0)
    train["data"].update(workers=0)
    train["mlflow"] = {"enabled": True}
    (tmp / "train.yaml").write_text(yaml.safe_dump(train))
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), tmp / "encoder.pth")  # a local file
    test = cohort / "synth_002"
    return {"SHARD_CONFIG": str(tmp / "shard.yaml"), "TRAIN_CONFIG": str(tmp / "train.yaml"),
            "ENCODER": "test_resnet", "ENCODER_WEIGHTS": str(tmp / "encoder.pth"), "SLIDE_OUTS": str(test / "outs"),
            "SLIDE_IMAGE": str(test / "synth_002_fullres.tif"), "NEW_IMAGE": str(test / "synth_002_fullres.tif"),
            "NEW_MPP": "0.5"}


def test_the_guide_has_one_setup_block_naming_the_variables_the_commands_use():
    blocks = _blocks()
    setups = [code for info, code in blocks if info == "bash setup"]
    assert len(setups) == 1 and "slides.csv" in setups[0]
    defined = set(re.findall(r"^([A-Z_]+)=", setups[0], re.M))
    used = set(re.findall(r"\$\{?([A-Z_]+)", "".join(code for info, code in blocks if info == "bash")))
    assert used and used <= defined, used - defined
    assert defined == used  # nothing defined that no command reads


@pytest.mark.slow
def test_the_guide_runs_on_slides_laid_out_as_space_ranger_writes_them(tiny_cohort, tmp_path):
    vars_ = _setup(tmp_path, tiny_cohort)
    script = ["set -euo pipefail", f"cd {tmp_path}", *(f"{k}={v}" for k, v in vars_.items())]
    script += [code for info, code in _blocks() if info == "bash"]
    env = train_env(PATH=f"{Path(sys.executable).parent}:{train_env()['PATH']}", MPLBACKEND="Agg")
    proc = subprocess.run(["bash", "-c", "\n".join(script)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = yaml.safe_load((tmp_path / "shards/16um/manifest.json").read_text())
    assert manifest["encoder"]["weights"].startswith("sha256:")  # the local file's weights were used
    measured = anndata.read_h5ad(tmp_path / "slide.h5ad")
    new = anndata.read_h5ad(tmp_path / "new_slide.h5ad")
    assert list(new.var_names) == list(measured.var_names) == list(manifest["genes"])
    assert new.n_obs > 0 and "measured" in measured.layers and "measured" not in new.layers
    assert "synth_002" in (tmp_path / "evaluation/evaluation.md").read_text()
    assert (tmp_path / "figures/show_new_slide.png").stat().st_size > 0
    assert (tmp_path / "slide_spatialdata.zarr").is_dir() and "magnet_square_016um" in proc.stdout

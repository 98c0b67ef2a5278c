"""`import magnet`, building the CLI parser and checking a config stay light: no deepspeed, ray or mlflow at
start-up, and no torch or timm to check a training config (model names come from a table, not the models)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("deepspeed", "ray", "mlflow", "torch", "timm")


def _loaded(code: str) -> list[str]:
    """The HEAVY modules in ``sys.modules`` after running ``code`` in a fresh interpreter."""
    code += f"\nimport sys; print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return [m for m in out.stdout.strip().splitlines()[-1].removeprefix("loaded:").split(",") if m]


def test_import_magnet_is_light():
    assert _loaded("import magnet, magnet.cli; magnet.cli.build_parser()") == []


def test_checking_a_training_config_imports_neither_torch_nor_timm():
    code = ("from magnet.config import load_config\nfrom magnet.errors import UserError\n"
            "from magnet.train_config import ExperimentConfig\n"
            "cfg = load_config(ExperimentConfig, 'configs/train/demo.yaml')\nassert cfg.model.name == 'magnet'\n"
            "try:\n    load_config(ExperimentConfig, 'configs/train/demo.yaml', ['model.name=nope'])\n"
            "except UserError as e:\n    assert 'stnet' in str(e), e\nelse:\n    raise SystemExit('not refused')")
    assert _loaded(code) == []


def test_the_model_name_table_is_what_the_models_register():
    import importlib

    from magnet.models.register import MODEL_NAMES, MODELS, register_model

    for module in set(MODEL_NAMES.values()):
        importlib.import_module(module)
    assert set(MODELS) == set(MODEL_NAMES)
    with pytest.raises(ValueError, match="not in MODEL_NAMES"):  # a model defined without a table entry
        register_model("unlisted")(lambda cfg, n_genes, feat_dim, geometry: None)
    assert "unlisted" not in MODELS


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "magnet", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "magnet-hd" in out.stdout

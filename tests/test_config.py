"""Typed config: defaults < YAML < flags < overrides; unknown keys and wrong types are named errors."""

import dataclasses

import pytest
import yaml

from magnet.config import config_from_saved, load_config, parse_override, save_config
from magnet.errors import UserError


@dataclasses.dataclass(kw_only=True)
class Optim:
    lr: float = 1e-3
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    name: str = "adamw"


@dataclasses.dataclass(kw_only=True)
class Root:
    seed: int = 0
    tag: str | None = None
    compile: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_precedence_defaults_yaml_flags_overrides(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("seed: 3\noptim:\n  lr: 0.01\n  name: sgd\n")
    cfg = load_config(Root, f, ["optim.lr=5e-4", "tag=run1"], seed=7)
    assert cfg.seed == 7  # flag beats YAML
    assert cfg.optim.lr == 5e-4  # override beats YAML
    assert cfg.optim.name == "sgd"  # YAML beats default
    assert cfg.optim.betas == [0.9, 0.999]  # default kept
    assert cfg.tag == "run1"


def test_int_widens_to_float_and_lists_parse():
    cfg = load_config(Root, None, ["optim.lr=1", "optim.betas=[0.5, 0.6]"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1.0
    assert cfg.optim.betas == [0.5, 0.6]


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"unknown key 'optim.lrr'.*bad.yaml"):
        load_config(Root, f)
    with pytest.raises(UserError, match=r"unknown key 'nope'"):
        load_config(Root, None, ["nope=1"])


@pytest.mark.parametrize(
    "override, key",
    [("seed=abc", "seed"), ("optim.lr=fast", "optim.lr"), ("compile=3", "compile"), ("seed=1.5", "seed"),
     ("optim.betas=[a, 1]", r"optim.betas\[0\]"), ("optim=3", "optim")],
)
def test_wrong_type_names_key(override, key):
    with pytest.raises(UserError, match=rf"key '{key}' expects"):
        load_config(Root, None, [override])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="key.sub=value"):
        parse_override("seed")
    with pytest.raises(UserError, match="file not found"):
        load_config(Root, tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_config(Root, bad)


def test_resolved_config_written_and_reloaded(tmp_path):
    cfg = load_config(Root, None, ["optim.lr=0.2", "seed=11"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml", command="test")
    doc = yaml.safe_load(path.read_text())
    assert doc["config"]["optim"]["lr"] == 0.2
    assert doc["command"] == "test"
    assert "git_revision" in doc and "magnet_version" in doc
    assert config_from_saved(Root, path) == cfg
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left

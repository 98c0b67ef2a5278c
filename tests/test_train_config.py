"""Experiment config, the DeepSpeed dict filled from it, lr schedules and the MLflow helper's rules."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from magnet.config import load_config
from magnet.errors import UserError
from magnet.train_config import ExperimentConfig
from magnet.registry.tracking import Tracker, artifact_root, flatten, mask_credentials
from magnet.train.ds_config import deepspeed_config
from magnet.train.schedule import lr_factor

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["tiny", "magnet_16um", "magnet_8um", "magnet_2um"])
def test_shipped_configs_load(name):
    cfg = load_config(ExperimentConfig, REPO / "configs/train" / f"{name}.yaml")
    assert cfg.train.steps >= 1 and cfg.model.width % cfg.model.heads == 0


def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(UserError, match="optim.lrr"):
        load_config(ExperimentConfig, None, ["optim.lrr=0.1"])
    with pytest.raises(UserError, match="data.workers"):
        load_config(ExperimentConfig, None, ["data.workers=two"])


@pytest.mark.parametrize("override", ["optim.lr=-0.1", "optim.lr=nan", "optim.lr=inf", "optim.lr=0",
                                      "optim.weight_decay=nan", "optim.betas=[0.9,1.5]"])
def test_optimizer_values_that_cannot_train_are_refused(override):
    """A negative or NaN learning rate reached the optimizer and failed there with a traceback."""
    with pytest.raises(UserError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(ExperimentConfig, None, [override])


@pytest.mark.parametrize("stage", ["zero1", "zero2", "zero3", "zero2_offload"])
def test_deepspeed_dict_takes_batch_precision_and_optimizer_from_the_experiment(stage):
    cfg = load_config(ExperimentConfig, None, [f"train.deepspeed={stage}", "data.micro_batch=3", "train.grad_accum=5",
                                               "optim.clip=0.5", "optim.lr=0.002"])
    ds = deepspeed_config(cfg, cuda=False)
    knobs = json.loads((REPO / "configs/deepspeed" / f"{stage}.json").read_text())
    assert ds["zero_optimization"] == knobs["zero_optimization"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["gradient_clipping"]) == (3, 5, 0.5)
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == 0.002
    assert ds["optimizer"]["params"].get("torch_adam") is (None if "offload" in stage else True)
    assert ds["torch_autocast"]["enabled"] is False  # auto: fp32 on the CPU, bf16 autocast on GPUs
    assert deepspeed_config(cfg, cuda=True)["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    sgd = deepspeed_config(load_config(ExperimentConfig, None, ["optim.name=sgd", "optim.momentum=0.8"]), cuda=False)
    assert sgd["optimizer"] == {"type": "SGD", "params": {"lr": 1e-3, "momentum": 0.8, "weight_decay": 0.01}}


def test_zero_file_must_hold_only_zero_knobs(tmp_path):
    bad = tmp_path / "z.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 1}, "train_batch_size": 64}))
    cfg = load_config(ExperimentConfig, None, [f"train.deepspeed={bad}"])
    with pytest.raises(UserError, match="train_batch_size: set in the experiment config"):
        deepspeed_config(cfg, cuda=False)
    with pytest.raises(UserError, match="train.deepspeed: no ZeRO config file 'zero9'"):
        deepspeed_config(load_config(ExperimentConfig, None, ["train.deepspeed=zero9"]), cuda=False)


def test_schedules():
    assert [lr_factor(s, 100, "cosine", 4, 0.1, 0.9) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 100, "cosine", 4, 0.1, 0.9) == pytest.approx(1.0)
    assert lr_factor(100, 100, "cosine", 4, 0.1, 0.9) == pytest.approx(0.1)
    assert lr_factor(52, 100, "cosine", 4, 0.0, 0.9) == pytest.approx(0.5)
    assert lr_factor(50, 100, "poly", 0, 0.0, 0.9) == pytest.approx(0.5 ** 0.9)
    assert lr_factor(99, 100, "constant", 0, 0.0, 0.9) == 1.0
    assert not math.isnan(lr_factor(0, 1, "cosine", 0, 0.0, 0.9))


def test_tracking_helper_rules(tmp_path):
    assert mask_credentials("https://user:secret@mlflow.example.org/") == "https://***@mlflow.example.org/"
    flat = flatten({"a": {"b": 1, "genes": [str(i) for i in range(100)]}, "c": "x"})
    assert flat == {"a.b": "1", "a.genes": "<100 items>", "c": "x"}
    assert artifact_root(f"sqlite:///{tmp_path}/m.db") == (tmp_path / "mlartifacts").as_uri()
    assert artifact_root("http://127.0.0.1:5000") is None
    cfg = load_config(ExperimentConfig, None, [f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]).mlflow
    off = Tracker(cfg, active=False)  # other ranks: every call is a no-op and touches nothing
    assert off.start("r", {"a": 1}, {}) is None
    off.log_metrics({"loss": 1.0}, 1)
    off.finish()
    assert not (tmp_path / "m.db").exists()


def test_magnet_train_refuses_a_bad_config_before_launching(capsys):
    from magnet.cli import main

    assert main(["train", "--config", str(REPO / "configs/train/tiny.yaml"), "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", "--config", str(REPO / "configs/train/tiny.yaml"), "train.deepspeed=zero7"]) == 2
    assert "train.deepspeed" in capsys.readouterr().err


def test_magnet_train_builds_the_launcher_command():
    from magnet.cli import build_parser
    from magnet.commands.train import command

    args = build_parser().parse_args(["train", "--config", "c.yaml", "--nproc", "2", "--master-port", "29999",
                                      "--resume", "latest", "train.steps=3"])
    cmd = command(args)
    assert cmd[1:6] == ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port"] and "29999" in cmd
    assert cmd[-5:] == ["--config", "c.yaml", "--resume", "latest", "train.steps=3"]
    assert cmd[-6].endswith("launch/train.py")
    args = build_parser().parse_args(["train", "--config", "c.yaml", "--launcher", "torchrun", "--nproc", "3"])
    assert command(args)[1:5] == ["-m", "torch.distributed.run", "--nproc_per_node", "3"]

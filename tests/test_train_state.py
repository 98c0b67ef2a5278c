"""The training loop's typed parts: parameter groups (no decay on biases and norms), the named loss
meter, the train state and the data stream's position as a state_dict."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fake_samples import TINY_GEOMETRY
from magnet.data.pipeline import ShardSet, TrainStream
from magnet.dist import WorldInfo
from magnet.train_config import DataConfig
from magnet.models.config import ModelConfig
from magnet.models.factory import create_model, model_names
from magnet.train.state import LossMeter, TrainState, param_groups


@pytest.mark.parametrize("name", ["magnet", "stnet"])
def test_biases_and_norms_are_not_decayed(name):
    cfg = ModelConfig(name=name, encoder="test_resnet", width=32, heads=4, gat_layers=1, k_bin=4, k_spot=4,
                      k_global=4, dropout=0.0, channels_last=False)
    model = create_model(cfg, 16, 32, TINY_GEOMETRY)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(p.requires_grad for p in model.parameters())
    quiet = {id(p) for p in no_decay["params"]}
    for mod_name, module in model.named_modules():
        if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
            assert id(module.weight) in quiet, mod_name
        if isinstance(module, nn.Linear):
            assert id(module.weight) not in quiet and (module.bias is None or id(module.bias) in quiet), mod_name
    assert all(id(b) in quiet for b in model.output_biases())  # they start at the training mean
    assert len(decay["params"]) > 0 and len(no_decay["params"]) > 0


def test_every_registered_model_is_built():
    assert {"magnet", "magnet_no_spot", "magnet_no_global", "magnet_no_graph", "stnet", "mean"} <= set(model_names())
    with pytest.raises(ValueError, match="unknown model name 'nope'"):
        create_model(_named("nope"), 4, 4, TINY_GEOMETRY)


def _named(name: str):
    cfg = ModelConfig(name="mean")
    object.__setattr__(cfg, "name", name)
    return cfg


def test_loss_meter_sums_named_parts():
    meter = LossMeter()
    meter.add(loss=1.0, micro_batches=1, bin_mse=0.5)
    meter.add(loss=3.0, micro_batches=1, bin_mse=1.5)
    assert meter.reduce() == {"bin_mse": 2.0, "loss": 4.0, "micro_batches": 2.0}
    assert meter.reduce() == {}


def test_train_state_round_trips():
    state = TrainState(step=7, best={"metric": "loss", "value": 0.5, "step": 6}, mlflow_run_id="r", corrupt_samples=2)
    again = TrainState()
    again.load_state_dict(state.state_dict())
    assert again == state


def test_stream_position_resumes_the_batches(tiny_shards):
    cfg = DataConfig(shards=str(tiny_shards), bin_um=16, micro_batch=2, max_bins=8, shuffle_buffer=8,
                     shuffle_initial=4, workers=0, epoch_samples=8)

    def stream() -> TrainStream:
        return TrainStream(ShardSet(cfg.shards, 16, None, None), cfg, WorldInfo(0, 1, 0), 0,
                           {"k_bin": 4, "k_spot": 3, "k_global": 3})

    def fp(batches):
        return [(b.slides, b.sample_grid.tolist(), int(b.bin_img.sum())) for b in batches]

    whole = stream()
    per_epoch = whole.batches_per_epoch
    ref = fp(itertools.islice(iter(whole), 2 * per_epoch + 1))
    first = stream()
    seen = fp(itertools.islice(iter(first), per_epoch + 1))
    assert first.state_dict() == {"epoch": 1, "batch_in_epoch": 1}
    second = stream()
    second.load_state_dict(first.state_dict())
    assert seen + fp(itertools.islice(iter(second), per_epoch)) == ref

"""Safety audit: no arbitrary unpickling when loading weights, checkpoints or shards, and no
credential in the recorded config. (A run's MLflow store and logs are searched for credentials from
its environment in test_train_deepspeed.py; unsafe tar member names in test_corrupt_shards.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from magnet.config import load_config
from magnet.errors import UserError
from magnet.train_config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("magnet", "sharding", "launch", "bench") for p in (REPO / d).rglob("*.py")]


def _calls(pattern: str) -> list[tuple[Path, str]]:
    """Every call matching ``pattern`` in the project's sources, with its argument text (to the closing paren)."""
    found = []
    for path in SOURCES:
        text = path.read_text()
        for m in re.finditer(pattern, text):
            depth, i = 0, m.end() - 1
            while True:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                if depth == 0:
                    break
                i += 1
            found.append((path, text[m.end():i]))
    return found


def test_torch_load_is_weights_only_and_np_load_never_unpickles():
    torch_loads = _calls(r"\btorch\.load\(")
    assert torch_loads, "the audit found no torch.load at all: the pattern is broken"
    assert all("weights_only=True" in args for _, args in torch_loads), torch_loads
    np_loads = _calls(r"\bnp\.load\(")  # numpy's default is allow_pickle=False
    assert np_loads and not any("allow_pickle=True" in args for _, args in np_loads), np_loads
    assert not _calls(r"\bpickle\.loads?\("), "shards, checkpoints and configs are never unpickled"


@pytest.mark.parametrize("uri", ["http://alice:pw-6d1f0c@mlflow:5000", "https://tok-41c8d3@mlflow.example"])
def test_tracking_uri_with_credentials_is_refused(uri):
    with pytest.raises(UserError, match="mlflow.tracking_uri: holds credentials.*MLFLOW_TRACKING_PASSWORD"):
        load_config(ExperimentConfig, None, [f"mlflow.tracking_uri={uri}"])

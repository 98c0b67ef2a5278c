"""Credentials in a tracking URI: one masking function hides everything between ``//`` and the last ``@``
(a password may hold ``@``), wherever a URI is shown; sweeps and experiments refuse a credentialed URI in
their config in one line (it would be recorded), as training does."""

from __future__ import annotations

import pytest

from magnet.cli import main
from magnet.registry.tracking import mask_credentials

SECRET_URI = "http://alice:p@ss@127.0.0.1:1/"


@pytest.mark.parametrize("uri, shown", [
    ("http://alice:p@ss@mlflow.example.org:5000/x", "http://***@mlflow.example.org:5000/x"),
    ("https://user:secret@mlflow.example.org/", "https://***@mlflow.example.org/"),
    ("https://tok@en:p/w@h@host/", "https://***@host/"),
    ("http://mlflow.example.org:5000/", "http://mlflow.example.org:5000/"),
    ("sqlite:///runs@2024/mlruns.db", "sqlite:///runs@2024/mlruns.db"),
    ("sqlite:////abs/mlruns.db", "sqlite:////abs/mlruns.db"),
    ("request to http://a:b@c@h/api failed (see x@y)", "request to http://***@h/api failed (see x@y)"),
])
def test_mask_hides_everything_up_to_the_last_at(uri, shown):
    assert mask_credentials(uri) == shown


def _one_line_without_secret(err: str) -> str:
    err = err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("magnet: error: "), err
    assert "alice" not in err and "p@ss" not in err and "ss@" not in err, err
    return err


@pytest.mark.parametrize("launcher, config", [("sweep", "configs/sweep/tiny.yaml"),
                                              ("experiment", "configs/experiment/tiny.yaml")])
def test_sweep_and_experiment_refuse_a_credentialed_uri_in_one_line(launcher, config, capsys, tmp_path):
    import importlib

    run = importlib.import_module(f"launch.{launcher}").main
    assert run(["--config", config, f"mlflow.tracking_uri={SECRET_URI}", f"out_dir={tmp_path}"]) == 2
    err = _one_line_without_secret(capsys.readouterr().err)
    assert "mlflow.tracking_uri: holds credentials (http://***@127.0.0.1:1/)" in err
    assert not any(tmp_path.iterdir())


def test_predict_masks_the_whole_password(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    argv = ["predict", "--model", "models:/tiny@champion", "--tracking-uri", SECRET_URI,
            "--image", str(tmp_path / "x.png"), "--mpp", "0.5", "--out", str(tmp_path / "o.h5ad")]
    assert main(argv) == 2
    err = _one_line_without_secret(capsys.readouterr().err)
    assert "http://***@127.0.0.1:1/" in err

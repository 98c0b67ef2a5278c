"""MLflow behind one helper: real on rank 0, a no-op on other ranks or when disabled.

A ``sqlite:///FILE`` tracking URI (the default, ``sqlite:///mlruns.db``) keeps its artifacts beside
the database (``FILE``'s folder / ``mlartifacts``); an ``http(s)://`` server works the same. Params
come from the resolved config only (never from the environment); credentials in a URI are masked
wherever the URI is recorded.
"""

from __future__ import annotations

import atexit
import os
import re
import socket
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from magnet.errors import UserError
from magnet.io import check_signals

LONG_LIST = 32  # longer lists (e.g. the gene list) are logged as artifacts, not params


def resolve_tracking_uri(uri: str | None) -> str:
    """The command-line URI, else ``$MLFLOW_TRACKING_URI``, else the local sqlite store."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlruns.db"


def absolute_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///FILE`` made absolute against this process's folder: what a driver hands to
    its Ray workers, whose folder and environment are not the driver's."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
    return uri


CONNECT_TIMEOUT_S = 5.0


def check_tracking_uri(uri: str, field: str, existing: bool) -> str:
    """Fail in seconds, naming ``field``, for a store that cannot answer (an unreachable server took about
    4 minutes of MLflow's retries; a mistyped sqlite path created folders and an empty database). ``existing``:
    the store must already hold something (a model to load, a version to promote)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if existing and not db.is_file():
            raise UserError(f"{uri}: {field}: database file not found")
        if not db.parent.is_dir():
            raise UserError(f"{uri}: {field}: folder {db.parent} does not exist")
    elif uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise UserError(f"{mask_credentials(uri)}: {field}: no tracking server answers at {parts.hostname}:{port} "
                            f"within {CONNECT_TIMEOUT_S:g} s ({e.strerror or type(e).__name__})") from None
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")  # then a server that dies mid-run fails in
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")  # about a minute, not MLflow's default minutes
    return uri


def mask_credentials(text: str) -> str:
    """``text`` (a URI, or a message quoting one) with everything between ``//`` and the last ``@`` of each
    URI hidden (a password may hold ``@``): the one way a tracking URI is shown or recorded. An empty
    authority (``sqlite:///``, ``file:///``) is left as is."""
    return re.sub(r"(?<!/)//(?!/)\S*@", "//***@", text)


def refuse_credentials(uri: str, field: str) -> str:
    """A config check (ValueError, made one line by the config loader): a tracking URI is recorded (run
    folders, MLflow params, the model, sweep and experiment records), so it must hold no credentials."""
    if mask_credentials(uri) != uri:
        raise ValueError(f"{field}: holds credentials ({mask_credentials(uri)}); set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD in the environment instead (never recorded)")
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"a.b": "value"}``; long lists summarised by their length."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)) and len(v) > LONG_LIST:
            out[key] = f"<{len(v)} items>"
        else:
            out[key] = str(v)[:500]
    return out


def artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite store, the artifact folder beside the database file (as a file URI)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):]).resolve()
    return (db.parent / "mlartifacts").as_uri()


# what the registered pyfunc needs to load and predict (besides magnet-hd itself), pinned to this
# environment; listing them skips MLflow's requirement inference (about 8 s per logged model)
MODEL_REQUIREMENTS = ("torch", "torchvision", "timm", "torch-geometric", "safetensors", "numpy", "scipy", "mlflow")


def model_requirements() -> list[str]:
    return [f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS]


class Tracker:
    """``start`` / ``log_*`` / ``finish``; every call does nothing when ``active`` is False."""

    def __init__(self, cfg, active: bool):
        self.cfg = cfg
        self.active = bool(active and cfg.enabled)
        self.run_id: str | None = None
        self._mlflow = None

    def start(self, run_name: str, params: dict, tags: dict, run_id: str | None = None) -> str | None:
        """Start (or, with ``run_id``, continue) a run; returns its id (None where inactive)."""
        if not self.active:
            return None
        import mlflow  # start-up time: the CLI imports this module

        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.cfg.tracking_uri)
        exp = mlflow.get_experiment_by_name(self.cfg.experiment)
        if exp is None:
            exp_id = mlflow.create_experiment(self.cfg.experiment, artifact_location=artifact_root(self.cfg.tracking_uri))
        else:
            exp_id = exp.experiment_id
        run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name)
        self.run_id = run.info.run_id
        # a run still open when the interpreter exits did not finish (MLflow's own exit hook records it FINISHED,
        # e.g. after a crashed peer's SIGTERM interrupted the error handling); registered after MLflow's, runs first
        atexit.register(self.finish, "FAILED")
        if run_id is None:
            mlflow.log_params(flatten(params))
        if getattr(self.cfg, "parent_run_id", ""):
            tags = {**tags, "mlflow.parentRunId": self.cfg.parent_run_id}
        mlflow.set_tags({k: str(v) for k, v in tags.items()})
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_table(self, data: dict[str, list], name: str) -> None:
        if self.active:
            self._mlflow.log_table(data=data, artifact_file=name)

    def log_figure(self, fig, name: str) -> None:
        """A matplotlib figure as a PNG artifact (then closed)."""
        if self.active:
            import matplotlib.pyplot as plt  # start-up time: the CLI imports this module

            self._mlflow.log_figure(fig, name)
            plt.close(fig)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self.active:
            self._mlflow.log_artifact(str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.active:
            self._mlflow.log_text(text, name)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.active:
            self._mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_model(self, python_model, artifacts: dict[str, str], signature, input_example=None) -> tuple[str, str | None]:
        """Log the pyfunc; register it under ``register_as`` (and set ``alias``). Returns (uri, version).
        Nothing is logged once a SIGTERM arrived, even one that Python dropped (magnet.io.check_signals)."""
        check_signals()
        if not self.active:
            return "", None
        name = self.cfg.register_as or None
        info = self._mlflow.pyfunc.log_model(
            name="model", python_model=python_model, artifacts=artifacts, signature=signature,
            registered_model_name=name, input_example=input_example, pip_requirements=model_requirements(),
        )
        version = str(info.registered_model_version) if name and info.registered_model_version else None
        if version and self.cfg.alias:
            set_alias(name, version, self.cfg.alias)
        return info.model_uri, version

    def finish(self, status: str = "FINISHED") -> None:
        if self.active and self._mlflow is not None and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)


def set_alias(name: str, version: str, alias: str) -> None:
    from mlflow import MlflowClient  # start-up time: the CLI imports this module

    MlflowClient().set_registered_model_alias(name, alias, version)


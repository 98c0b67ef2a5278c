"""Load the model to predict with: a registry URI (``models:/NAME@ALIAS``), a run URI (``runs:/ID/model``),
an MLflow model folder, or a training run's ``model/`` folder.

Besides the pyfunc itself, prediction needs what the shards were built with: the neighbourhood size
``K`` (from the reference example input, ``nbr_mask`` has ``K+1`` rows) and the frozen encoder
(``model_meta.json``: name, weights id, input size), so features are computed as in training.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from magnet.format.schema import FORMAT_VERSION
from magnet.io import sha256_file
from magnet.registry.tracking import check_tracking_uri, mask_credentials, resolve_tracking_uri


@dataclasses.dataclass
class LoadedModel:
    uri: str
    python_model: object  # magnet.registry.pyfunc.MagnetPyfunc: genes, normalisation, geometry, config, predict_batch
    k_neighbours: int
    encoder: dict  # name, feat_dim, weights (id), input_px, precision (fp32 when not recorded)
    source: dict  # what to record: uri, registered version / run id where known
    slides: dict = dataclasses.field(default_factory=dict)  # slide -> split, fingerprint as trained ({}: older models)

    @property
    def weights(self) -> str:
        """sha256 of model.safetensors: the same model, however named."""
        return self.source["weights_sha256"]

    @property
    def genes(self) -> list[str]:
        return list(self.python_model.genes)


def _mlflow_error(uri: str, e: Exception) -> UserError:
    first = str(getattr(e, "message", e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{uri}: --model: {mask_credentials(first)}")  # MLflow's messages quote the server URL


def _weights_error(uri: str, e: BaseException) -> UserError | None:
    """A ``model.safetensors`` that cannot be read, or whose tensors do not fit the model ``config.yaml``
    builds (torch's multi-line state-dict report), as one line; None for any other error."""
    while e is not None:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if type(e).__name__ == "SafetensorError":
            return UserError(f"{uri}: weights: model.safetensors cannot be read ({first[:200]})")
        if isinstance(e, RuntimeError) and first.startswith("Error(s) in loading state_dict"):
            problems = [line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip()]
            detail = problems[0][:200] if problems else first
            more = f"; and {len(problems) - 1} more" if len(problems) > 1 else ""
            return UserError(f"{uri}: weights: model.safetensors does not fit the model config.yaml describes "
                             f"({detail}{more})")
        e = e.__cause__ or e.__context__
    return None


def _artifacts_dir(model_dir: Path) -> Path:
    return model_dir / "artifacts" if (model_dir / "MLmodel").is_file() else model_dir


def _from_folder(model_dir: Path, uri: str, source: dict) -> LoadedModel:
    art = _artifacts_dir(model_dir)
    for name in ("model_meta.json", "example_input.npz", "model.safetensors", "config.yaml"):
        if not (art / name).is_file():
            raise UserError(f"{art / name}: --model: file missing (not a MagNet model folder)")
    meta = json.loads((art / "model_meta.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{uri}: format_version: the model was trained on shards of format "
                        f"{meta.get('format_version')}, prediction computes format {FORMAT_VERSION} inputs; retrain it")
    if (model_dir / "MLmodel").is_file():
        import mlflow.pyfunc  # start-up time: the CLI imports this module

        try:
            python_model = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model()
        except UserError:  # e.g. weights that do not match their sha256: already one line
            raise
        except Exception as e:  # mlflow raises several types for a broken model folder
            raise (_weights_error(uri, e) or _mlflow_error(uri, e)) from None
    else:
        from magnet.registry.pyfunc import MagnetPyfunc  # start-up time: the CLI imports this module

        python_model = MagnetPyfunc()
        try:
            python_model.load(str(art / "model.safetensors"), str(art / "model_meta.json"), str(art / "config.yaml"))
        except Exception as e:
            err = _weights_error(uri, e)
            if err is None:
                raise
            raise err from None
    if not isinstance(meta.get("encoder"), dict) or "name" not in meta["encoder"]:
        raise UserError(f"{art / 'model_meta.json'}: encoder: missing (the shard encoder is needed for features)")
    with np.load(art / "example_input.npz") as ex:
        k = int(ex["nbr_mask"].shape[0]) - 1
    sha = meta.get("weights_sha256") or sha256_file(art / "model.safetensors")  # checked at load; older models: hashed
    return LoadedModel(uri=uri, python_model=python_model, k_neighbours=k, encoder=dict(meta["encoder"]),
                       source={**source, "weights_sha256": sha}, slides=dict(meta.get("slides", {})))


def load_model(spec: str, tracking_uri: str | None = None) -> LoadedModel:
    """Resolve ``spec`` and load it; a model that cannot be found is a one-line :class:`UserError`."""
    local = Path(spec)
    if "://" not in spec and ":/" not in spec:
        if not local.is_dir():
            raise UserError(f"{spec}: --model: folder not found (expected models:/NAME@ALIAS, runs:/ID/model or a folder)")
        return _from_folder(local, str(local.resolve()), {"uri": str(local.resolve())})

    # start-up time: the CLI imports this module
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    if spec.startswith(("models:/", "runs:/")):  # resolved through the tracking store (s3://, file:// are not)
        check_tracking_uri(uri, "--tracking-uri", existing=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    source = {"uri": spec, "tracking_uri": mask_credentials(uri)}
    try:
        if spec.startswith("models:/"):
            source.update(_registry_version(spec))
        with tempfile.TemporaryDirectory(prefix="magnet-model-") as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=spec, dst_path=tmp)
            return _from_folder(Path(path), spec, source)
    except MlflowException as e:
        raise _mlflow_error(spec, e) from None
    except ImportError as e:  # e.g. s3:// without boto3: MLflow imports the store's client on first use
        raise UserError(f"{spec}: --model: reading it needs the Python package '{e.name}', which is not installed "
                        f"(pip install {e.name})") from None


def _registry_version(spec: str) -> dict:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> name, version, run id (raises when unknown)."""
    from mlflow import MlflowClient  # start-up time: the CLI imports this module

    ref = spec[len("models:/"):]
    client = MlflowClient()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in ref:
        name, version = ref.split("/", 1)
        mv = client.get_model_version(name, version)
    else:
        raise UserError(f"{spec}: --model: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return {"registered_model": mv.name, "version": str(mv.version), "run_id": mv.run_id}

"""A tissue-tuned frozen encoder: ``encoder.weights`` naming a trained MagNet model (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION`` or ``runs:/ID/model`` in ``encoder.tracking_uri``, an MLflow model folder, a training run
folder or its ``model/`` folder). Its bin encoder, trained end to end on the bin patches, becomes the frozen
encoder of every level's features (spot, global and cached bin features), so the two regimes chain: train end
to end, re-shard with that encoder, train again on its features.

The bin encoder's tensors (``encoder.backbone.*`` of the model's ``model.safetensors``) are written to
``{out}/tuned_encoder.safetensors`` and the shards are made with ``encoder.name`` = the model's ``model.encoder``
and ``encoder.weights`` = that file, so the manifest records the file's sha256 (and ``weights_source``, the model),
and ``magnet predict`` with a model trained on these shards takes ``encoder_weights={out}/tuned_encoder.safetensors``
like any local weights file."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from magnet.errors import UserError
from magnet.io import atomic_path
from magnet.registry.tracking import check_tracking_uri, resolve_tracking_uri

PREFIX = "encoder.backbone."
FILE = "tuned_encoder.safetensors"


def is_model(weights: str | None) -> bool:
    """Whether ``encoder.weights`` names a trained model rather than a weights file or a hub name."""
    if not weights:
        return False
    return weights.startswith(("models:/", "runs:/")) or Path(weights).is_dir()


def _artifacts(folder: Path, where: str) -> Path:
    for cand in (folder / "artifacts", folder / "model", folder / "model" / "artifacts", folder):
        if (cand / "model.safetensors").is_file() and (cand / "config.yaml").is_file():
            return cand
    raise UserError(f"{where}: encoder.weights: not a MagNet model folder (no model.safetensors and config.yaml)")


def _export(art: Path, out: Path, where: str) -> tuple[str, dict]:
    """Write the bin encoder of the model in ``art`` to ``out``; return its timm name and constructor arguments."""
    model = (yaml.safe_load((art / "config.yaml").read_text()) or {}).get("config", {}).get("model", {})
    if model.get("bin_input", "image") != "image" or "encoder" not in model:
        raise UserError(f"{where}: encoder.weights: the model has no bin encoder trained end to end "
                        f"(model.bin_input={model.get('bin_input')}, model.name={model.get('name')})")
    state = {k[len(PREFIX):]: v for k, v in load_file(str(art / "model.safetensors")).items() if k.startswith(PREFIX)}
    if not state:
        raise UserError(f"{where}: encoder.weights: the model's weights hold no {PREFIX}* tensors")
    out.parent.mkdir(parents=True, exist_ok=True)  # only once the model is known to have a bin encoder
    with atomic_path(out) as tmp:
        save_file(state, str(tmp))
    return str(model["encoder"]), dict(model.get("encoder_kwargs") or {})


def resolve(cfg, out: Path):
    """``cfg`` (ShardConfig) with a model in ``encoder.weights`` replaced by its exported bin encoder in ``out``,
    and the model's URI (None when ``encoder.weights`` names no model)."""
    weights = cfg.encoder.weights
    if not is_model(weights):
        return cfg, None
    if Path(weights).is_dir():
        name, kwargs = _export(_artifacts(Path(weights), weights), out / FILE, weights)
    else:
        # start-up time: mlflow (over 1 s) loads only for an encoder from the registry, not for every magnet shard
        import mlflow
        from mlflow.exceptions import MlflowException

        uri = resolve_tracking_uri(cfg.encoder.tracking_uri)
        check_tracking_uri(uri, "encoder.tracking_uri", existing=True)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        try:
            with tempfile.TemporaryDirectory(prefix="magnet-encoder-") as tmp:
                path = Path(mlflow.artifacts.download_artifacts(artifact_uri=weights, dst_path=tmp))
                name, kwargs = _export(_artifacts(path, weights), out / FILE, weights)
        except MlflowException as e:
            first = str(getattr(e, "message", e)).strip().splitlines()[0]
            raise UserError(f"{weights}: encoder.weights: {first}") from None
    encoder = dataclasses.replace(cfg.encoder, name=name, weights=str(out / FILE), kwargs=kwargs)
    return dataclasses.replace(cfg, encoder=encoder), weights

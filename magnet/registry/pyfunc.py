"""The registry model: an MLflow pyfunc that carries its weights, gene list, normalisation and config.

Input: one decoded shard sample (docs/shard_format.md) as a dict of numpy arrays named like the
members, plus ``tile`` int64 (2,) = (gx, gy); ``meta`` is rebuilt from the model's own geometry.
Output: ``{"bin": (n, G), "spot": (Ns, G), "global": (Ng, G)}`` float32, genes in ``genes`` order
(levels the model lacks are left out).
Weights are a safetensors file whose sha256 ``model_meta.json`` records (a damaged file is refused at load);
``unwrap_python_model()`` exposes ``genes``, ``normalisation``, ``geometry``, ``config`` and
``predict_batch(Batch)`` for callers that build batches themselves. Inputs with non-finite values or bin
positions outside the tile's image, and non-finite outputs, are refused in one line (a :class:`UserError`).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from safetensors.torch import load_file, save_file

from magnet.batch import collate
from magnet.config import config_from_saved, save_config
from magnet.errors import UserError
from magnet.format.check import Dims, check_sample
from magnet.format.sample import Meta, Sample
from magnet.format.schema import MEMBERS, Axis
from magnet.format.tar import sha256_file
from magnet.geometry import Geometry
from magnet.models.counts import CountModel, predicted_libsize, for_loss
from magnet.models.factory import create_model
from magnet.train_config import ExperimentConfig

INPUT_MEMBERS = tuple(m.name for m in MEMBERS if not m.optional)  # members fed to a model with bin_input=image


def input_members(bin_input: str, field: bool = False) -> tuple[str, ...]:
    """Members fed to a model with ``model.bin_input``: ``features`` takes ``bin_feat`` in place of the image, and
    ``bin_field`` beside it with ``model.field``."""
    if bin_input == "features":
        return tuple(m for m in INPUT_MEMBERS if m != "image") + ("bin_feat",) + (("bin_field",) if field else ())
    return INPUT_MEMBERS
VARIABLE_AXES = {m.name: tuple(i for i, a in enumerate(m.axes) if a in (Axis.BIN, Axis.PIXEL)) for m in MEMBERS}


class MagnetPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        self.load(context.artifacts["weights"], context.artifacts["meta"], context.artifacts["config"])

    def load(self, weights: str, meta: str, config: str) -> None:
        info = json.loads(Path(meta).read_text())
        check_weights(weights, info)
        self.config = config_from_saved(ExperimentConfig, config)
        self.genes = list(info["genes"])
        self.normalisation = info["normalisation"]
        self.bin_um = info["bin_um"]
        self.geometry = Geometry(**{k: info["geometry"][k] for k in ("mpp", "global_px", "spot_px", "bin_px")})
        self.feat_dim = info["feat_dim"]
        self.model = for_loss(lambda width: create_model(self.config.model, width, self.feat_dim, self.geometry),
                              self.config.loss, len(self.genes), self.normalisation, meta)
        self.model.load_state_dict(load_file(weights))
        self.model.eval()

    @property
    def bin_extras(self) -> tuple[str, ...]:
        """The per-bin outputs beside the prediction (:meth:`predict_batch`): a count model's ``rate`` (n, G) per
        unit exposure and, trained with ``loss.libsize``, its predicted ``libsize`` (n,) (magnet/models/counts.py)."""
        if not isinstance(self.model, CountModel):
            return ()
        return ("rate", "libsize") if self.model.libsize else ("rate",)

    def predict_batch(self, batch, bf16: bool = False) -> dict[str, np.ndarray]:
        """Forward on the model's device (bf16 autocast when asked); float32 numpy out, all finite (else a
        :class:`UserError`: a model that gives NaN must not pass for a prediction)."""
        device = next(self.model.parameters()).device
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pred = self.model(batch.to(device))
        out = {"bin": pred.bin, "spot": pred.spot, "global": pred.glob,
               "rate": None if pred.bin_log_rate is None else torch.exp(pred.bin_log_rate),
               "libsize": None if pred.bin_log_libsize is None else predicted_libsize(pred.bin_log_libsize)}
        out = {k: v.float().cpu().numpy() for k, v in out.items() if v is not None}
        for level, values in out.items():
            bad = int(values.size - np.isfinite(values).sum())
            if bad:
                raise UserError(f"model: output: {bad} of {values.size} predicted {level} values are not finite "
                                "(the model's weights are damaged or diverged); nothing predicted")
        return out

    def predict(self, context, model_input, params=None):
        gx, gy = (int(v) for v in np.asarray(model_input["tile"]).ravel()[:2])
        meta = Meta(slide="input", gx=gx, gy=gy, mpp=self.geometry.mpp, bin_um=self.bin_um)
        names = input_members(self.config.model.bin_input, self.config.model.field > 0)
        sample = Sample(meta=meta, arrays={k: np.asarray(model_input[k]) for k in names})
        self.check_input(sample)
        m = self.config.model
        return self.predict_batch(collate([sample], self.geometry, k_bin=m.k_bin, k_spot=m.k_spot, k_global=m.k_global))


    def check_input(self, sample: Sample) -> None:
        """The schema, finite values, and bin positions inside the tile's image ``[0, image_px)``."""
        dims = Dims(G=len(self.genes), K1=int(np.shape(sample["nbr_mask"])[0]), S=self.geometry.n_spots,
                    F=self.feat_dim, P=self.geometry.image_px, L=self.config.model.field)
        check_sample(sample, dims, "input", finite=True, image=self.config.model.bin_input == "image")
        xy, size = sample["bin_xy"], self.geometry.image_px
        outside = int(((xy < 0) | (xy >= size)).any(axis=1).sum())
        if outside:
            raise UserError(f"input.bin_xy: {outside} of {len(xy)} bin positions lie outside the tile's image "
                            f"[0, {size}) px")


def check_weights(weights: str | Path, info: dict) -> None:
    """``weights`` must hash to the sha256 that ``model_meta.json`` records (models written before it was
    recorded carry none and are not checked)."""
    want = info.get("weights_sha256")
    if want is not None and sha256_file(weights) != want:
        raise UserError(f"{weights}: weights: sha256 does not match model_meta.json's weights_sha256 "
                        "(the file is damaged or was replaced); refused")


def model_input(sample: Sample, bin_input: str = "image", field: bool = False) -> dict[str, np.ndarray]:
    """A decoded sample as the pyfunc's input dict for a model with ``model.bin_input`` (``field``: model.field)."""
    out = {k: np.ascontiguousarray(sample[k]) for k in input_members(bin_input, field)}
    out["tile"] = np.array([sample.meta.gx, sample.meta.gy], np.int64)
    return out


def signature(example: dict, output: dict):
    def spec(name: str, a: np.ndarray, variable=()) -> TensorSpec:
        shape = tuple(-1 if i in variable else n for i, n in enumerate(a.shape))
        return TensorSpec(a.dtype, shape, name)

    inputs = Schema([spec(k, v, VARIABLE_AXES.get(k, ())) for k, v in example.items()])
    outputs = Schema([spec(k, v, (0,)) for k, v in output.items()])
    return ModelSignature(inputs=inputs, outputs=outputs)


def write_model_files(folder: Path, state_dict: dict, cfg, shard_set, example: dict, output: dict) -> dict[str, str]:
    """Weights, meta, config and a reference example (the engine's output on it) into ``folder``;
    returns the pyfunc ``artifacts`` mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(folder / "model.safetensors"))
    man = shard_set.manifest
    meta = {"genes": shard_set.genes, "normalisation": shard_set.normalisation, "bin_um": man.bin_um,
            "geometry": shard_set.geometry.to_dict(), "feat_dim": man.feat_dim,
            "format_version": man.format_version, "encoder": man.encoder,
            "weights_sha256": sha256_file(folder / "model.safetensors"),
            # the slides as the model saw them, so magnet evaluate can refuse its training slides (by name and by
            # content) where the shard folder is not reachable, e.g. a registered model on another machine
            "slides": {name: {"split": rec["split"], "fingerprint": rec["fingerprint"]}
                       for name, rec in sorted(man.slides.items())}}
    (folder / "model_meta.json").write_text(json.dumps(meta, indent=1))
    save_config(cfg, folder / "config.yaml")
    np.savez(folder / "example_input.npz", **example)
    np.savez(folder / "example_output.npz", **output)
    names = {"weights": "model.safetensors", "meta": "model_meta.json", "config": "config.yaml",
             "example_input": "example_input.npz", "example_output": "example_output.npz"}
    return {k: str(folder / v) for k, v in names.items()}

"""A model folder copied with seeded noise on its weights: another model of the same architecture (a replicate,
or a fold's second model), its ``model_meta.json`` checksum kept true."""

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from magnet.io import sha256_file


def noisy_copy(model: Path, out: Path, seed: int = 1) -> Path:
    shutil.copytree(model, out)
    path = out / "model.safetensors"
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    rng = np.random.default_rng(seed)
    weights = {k: v + (0.05 * v.std() * rng.standard_normal(v.shape)).astype(v.dtype) if v.dtype.kind == "f"
               and v.size > 1 else v for k, v in load_file(str(path)).items()}
    save_file(weights, str(path), metadata=metadata)
    meta_path = out / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    if "weights_sha256" in meta:
        meta["weights_sha256"] = sha256_file(path)
        meta_path.write_text(json.dumps(meta, indent=1))
    return out

"""Image encoders: any timm model by name, weights from a local file or a hub name.

Used trainable at the bin level of MagNet and frozen (stop-grad) when the sharding stage computes
spot- and global-tile features. ``weights`` is ``None`` (random init from a fixed seed), a local
checkpoint path (``.safetensors`` or a ``torch.save`` state dict, loaded with
``weights_only=True``), or ``hf-hub:ORG/NAME`` / ``timm:NAME`` for timm's pretrained weights
(needs network access or a populated local cache). ``kwargs`` go to ``timm.create_model`` (a foundation model's
constructor arguments, e.g. UNI: ``vit_large_patch16_224`` with ``init_values: 1.0e-5, dynamic_img_size: true``).
The one builder of every level's encoder: the sharding stage's frozen one (``encoder.*``) and the bin encoder
(``model.encoder*``).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from magnet.errors import UserError
from magnet.io import sha256_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def weights_id(weights: str | None, seed: int) -> str:
    """What the manifest and MLflow record about the weights: a file's sha256, a hub name or the seed."""
    if weights is None:
        return f"random-seed-{seed}"
    p = Path(weights)
    if p.is_file():
        return "sha256:" + sha256_file(p)  # in blocks: a foundation encoder's file is GBs
    return weights


class Encoder(nn.Module):
    """timm backbone -> pooled embedding ``(N, num_features)``; input (N, 3, H, W) uint8 in [0, 255] or float in
    [0, 1]. ``max_batch`` (0: all at once) splits the input into calls of at most that many images (prediction and
    the sharding stage's frozen features, :func:`magnet.models.inference.prepare_encoder`): small calls keep a
    conv's activations in the CPU's cache, and each image's embedding is its own, so the split changes nothing
    beyond fp32 rounding."""

    def __init__(self, name: str, weights: str | None = None, seed: int = 0, channels_last: bool = True,
                 kwargs: dict | None = None,
                 keys: tuple[str, str] = ("model.encoder", "model.encoder_weights")):  # config keys, for errors
        super().__init__()
        if name not in timm.list_models() and not name.startswith("hf-hub:"):
            raise UserError(f"encoder: unknown timm model name '{name}' (key {keys[0]})")
        pretrained = weights is not None and not Path(weights).exists()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            try:
                self.backbone = timm.create_model(
                    weights[len("timm:"):] if pretrained and weights.startswith("timm:") else name,
                    pretrained=pretrained, num_classes=0, **(kwargs or {}),
                )
            except TypeError as e:  # a constructor argument the architecture does not take
                raise UserError(f"encoder: '{name}': kwargs: {e}") from None
            except Exception as e:  # timm raises several types for missing/unreachable weights
                raise UserError(f"encoder: cannot load weights '{weights}' for '{name}': {type(e).__name__}") from None
        if weights is not None and Path(weights).exists():
            state = _load_state_dict(Path(weights))
            missing, unexpected = self.backbone.load_state_dict(state, strict=False)
            loaded = len(state) - len(unexpected)
            if loaded == 0:
                raise UserError(f"encoder: {weights}: no tensor matches model '{name}' (keys {keys[0]}, "
                                f"{keys[1]})")
            # a checkpoint's classifier head is dropped (num_classes=0); any other mismatch means another
            # architecture or other constructor arguments (e.g. a ViT's layer scale), which must not load silently
            head = str(getattr(self.backbone, "pretrained_cfg", {}).get("classifier") or "head")
            unexpected = [k for k in unexpected if not k.startswith((head + ".", "head.", "fc.", "classifier."))]
            if missing or unexpected:
                what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
                raise UserError(f"encoder: {weights}: does not fit timm model '{name}' ({what}, "
                                f"{len(missing)} missing and {len(unexpected)} unexpected tensors)")
        self.num_features = self.backbone.num_features
        self.weights_id = weights_id(weights, seed)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.max_batch = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n = self.max_batch
        if n and len(images) > n:
            return torch.cat([self._embed(images[i:i + n]) for i in range(0, len(images), n)])
        return self._embed(images)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images
        x = (x - self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x)

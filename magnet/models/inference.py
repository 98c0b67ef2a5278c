"""A trained model made faster for prediction, without changing what it computes beyond fp32 rounding:
batch norms folded into the convolutions before them, channels-last convolutions, the encoder called on
a few images at a time, optionally ``torch.compile``. (PyTorch's own ``torch.fx`` fusion needs a
symbolically traceable model and folds only plain ``BatchNorm2d``; timm's norm+activation layers and
untraceable models need the pairs below.)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from magnet.models.encoder import Encoder

TOLERANCE = 1e-4  # max |difference| / max |output| on a random batch for a fold to be kept


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode ``bn`` (running statistics) into ``conv``'s weight and bias, in place."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1 / torch.sqrt(
        bn.running_var + bn.eps)
    shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
    w = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    b = (conv.bias.detach() * scale if conv.bias is not None else 0) + shift
    conv.weight = nn.Parameter(w, requires_grad=False)
    conv.bias = nn.Parameter(b, requires_grad=False)


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What is left of ``bn`` once folded: nothing for a plain BatchNorm2d, the activation for timm's
    ``BatchNormAct2d`` (norm, dropout, activation)."""
    rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
    return nn.Sequential(*rest) if rest else nn.Identity()


def _pairs(module: nn.Module):
    """(parent, conv, bn name, bn) where the forward applies ``bn`` straight to ``conv``'s output: consecutive
    members of a Sequential, and timm's naming (``conv``/``bn``, ``conv1``/``bn1``, ...)."""
    for parent in module.modules():
        children = dict(parent.named_children())
        names = list(children)
        if isinstance(parent, nn.Sequential):
            candidates = zip(names, names[1:])
        else:
            candidates = ((n, n.replace("conv", "bn", 1)) for n in names if "conv" in n)
        for c, b in candidates:
            conv, bn = children.get(c), children.get(b)
            if isinstance(conv, nn.Sequential) and len(conv) and not isinstance(parent, nn.Sequential):
                conv = conv[-1]  # timm's deep stem: conv1 = Sequential(conv, bn, act, ..., conv), then bn1
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats
                    and bn.num_features == conv.out_channels):
                yield parent, conv, b, bn


def fold_batch_norms(encoder: nn.Module, example: torch.Tensor) -> tuple[nn.Module, int]:
    """A copy of eval-mode ``encoder`` with its conv+batch-norm pairs folded, and the number folded; the
    original when the copy's output on ``example`` differs (a pair the naming matched but the forward does not
    apply in that order, e.g. pre-activation blocks)."""
    folded = copy.deepcopy(encoder).eval()
    n = 0
    for parent, conv, bn_name, bn in list(_pairs(folded)):
        _fold(conv, bn)
        setattr(parent, bn_name, _after_norm(bn))
        n += 1
    if n == 0:
        return encoder, 0
    with torch.inference_mode():
        ref, out = encoder(example), folded(example)
    if not torch.allclose(out, ref, rtol=0, atol=TOLERANCE * max(ref.abs().max().item(), 1.0)):
        return encoder, 0
    return folded, n


def for_inference(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = True, compile: bool = False,
                  encoder_batch: int = 0, input_px: int = 64) -> dict:
    """Ready ``model`` (eval mode) for prediction in place: its image encoder (``model.encoder``, a
    :class:`magnet.models.encoder.Encoder`) through :func:`prepare_encoder`. Returns what was done."""
    model.eval()
    if hasattr(model, "inference_ready"):  # a cohort worker predicts slide after slide with one model
        return model.inference_ready
    enc = getattr(model, "encoder", None)
    if not isinstance(enc, Encoder):
        model.inference_ready = {"folded_batch_norms": 0, "channels_last": False, "compiled": False,
                                 "encoder_batch": 0}
    else:
        model.inference_ready = prepare_encoder(enc, fold_bn=fold_bn, channels_last=channels_last, compile=compile,
                                                encoder_batch=encoder_batch, input_px=input_px)
    return model.inference_ready


def prepare_encoder(enc, *, fold_bn: bool = True, channels_last: bool = True, compile: bool = False,
                    encoder_batch: int = 0, input_px: int = 64) -> dict:
    """An eval-mode :class:`magnet.models.encoder.Encoder` (a model's bin encoder, or the sharding stage's frozen
    one) folded and channels-last, optionally compiled, and called on at most ``encoder_batch`` images at a time
    (0: a whole batch), in place. Returns what was done."""
    done = {"folded_batch_norms": 0, "channels_last": False, "compiled": False, "encoder_batch": 0}
    if fold_bn:
        example = torch.rand(2, 3, input_px, input_px, generator=torch.Generator().manual_seed(0))
        example = example.to(next(enc.parameters()).device)
        enc.backbone, done["folded_batch_norms"] = fold_batch_norms(enc.backbone, (example - enc.mean) / enc.std)
    if channels_last:
        enc.backbone = enc.backbone.to(memory_format=torch.channels_last)
        enc.channels_last = done["channels_last"] = True
    if compile:
        enc.backbone = torch.compile(enc.backbone, dynamic=True)
        done["compiled"] = True
    enc.max_batch = done["encoder_batch"] = encoder_batch
    return done

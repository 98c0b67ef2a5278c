"""Per-sample stages after the shuffle buffer: late decode, bin subsampling or chunking, augmentation.

A decoded sample is a dict named as the shard members (docs/shard_format.md) without extensions:
``image`` (H, W, 3) uint8, ``bin_xy``, ``bin_rc``, ``bin_spot``, ``bin_expr`` (and ``bin_counts``),
``spot_expr``, ``spot_mask``, ``spot_feat``, ``global_expr``, ``global_feat``, ``nbr_offset``,
``nbr_mask``, ``meta`` (dict), plus ``key``. Coordinates are continuous pixel positions of the
stored image (pixel ``i`` spans ``[i, i + 1)``), so a flip maps ``x`` to ``side - x``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import zstandard

from magnet.errors import UserError
from magnet.geometry import Geometry

BIN_FIELDS = ("bin_xy", "bin_rc", "bin_spot", "bin_expr", "bin_counts")
SPOT_FIELDS = ("spot_expr", "spot_mask", "spot_feat")  # (K+1, S, ...): the spot cell is axis 1
IMAGE_EXTS = ("jpg", "png", "webp")


def decode_sample(raw: dict) -> dict:
    """Raw member bytes -> arrays: zstd + ``np.load(allow_pickle=False)``, the image with PIL."""
    from PIL import Image

    out = {"key": raw["__key__"]}
    dctx = zstandard.ZstdDecompressor()
    for name, data in raw.items():
        if name.startswith("__"):
            continue
        where = f"{raw.get('__url__', '?')}: {raw['__key__']}.{name}"
        if name.endswith(".npy.zst"):
            try:
                out[name[: -len(".npy.zst")]] = np.load(io.BytesIO(dctx.decompress(data)), allow_pickle=False)
            except (ValueError, zstandard.ZstdError) as e:
                raise UserError(f"{where}: cannot decode ({e})") from None
        elif name.split(".", 1)[0] == "image" and name.rsplit(".", 1)[-1] in IMAGE_EXTS:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    out["image"] = np.asarray(im.convert("RGB"))
            except (OSError, ValueError) as e:  # PIL: unidentified or truncated image
                raise UserError(f"{where}: cannot decode ({e})") from None
        elif name == "meta.json":
            try:
                out["meta"] = json.loads(data)
            except ValueError as e:
                raise UserError(f"{where}: cannot decode ({e})") from None
    for need in ("image", "bin_xy", "meta"):
        if need not in out:
            raise UserError(f"{raw.get('__url__', '?')}: {raw['__key__']}: member {need} missing")
    return out


def take_bins(sample: dict, idx: np.ndarray) -> dict:
    out = dict(sample)
    for f in BIN_FIELDS:
        if f in sample:
            out[f] = sample[f][idx]
    return out


def window_bins(sample: dict, cap: int, rng: np.random.Generator) -> dict:
    """At most ``cap`` bins: a run of consecutive bins in stored (row-major) order from a random start.

    The same shape as the evaluation chunks (:func:`chunk_bins`), so MagNet's bin graph (kNN within the
    batch) links bins at the same distances in training as in evaluation and prediction; a random
    subset of the tile spread the bins out and the graph saw neighbours twice as far apart.
    """
    n = len(sample["bin_xy"])
    if n <= cap:
        return sample
    start = int(rng.integers(n - cap + 1))
    return take_bins(sample, np.arange(start, start + cap))


def chunk_bins(sample: dict, cap: int) -> list[dict]:
    """All bins in pieces of at most ``cap`` (evaluation: every bin exactly once)."""
    n = len(sample["bin_xy"])
    if n <= cap:
        return [sample]
    return [take_bins(sample, np.arange(i, min(i + cap, n))) for i in range(0, n, cap)]


def _spot_permutation(geometry: Geometry, fn) -> np.ndarray:
    """Where each spot cell goes when tile-local points move by ``fn``."""
    return geometry.spot_of(fn(geometry.spot_centres())).astype(np.int64)


def augment(sample: dict, geometry: Geometry, rng: np.random.Generator) -> dict:
    """A random flip and 90 degree rotation, applied to the image, bin and spot positions and neighbour offsets."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    if k == 0 and not flip:
        return sample
    side = float(sample["image"].shape[1])

    def move_points(xy: np.ndarray) -> np.ndarray:
        x, y = xy[:, 0], xy[:, 1]
        if flip:
            x = side - x
        for _ in range(k):  # np.rot90 (counter-clockwise): new (x, y) = (y, side - x)
            x, y = y, side - x
        return np.stack([x, y], axis=1).astype(xy.dtype)

    def move_vectors(v: np.ndarray) -> np.ndarray:
        x, y = v[:, 0], v[:, 1]
        if flip:
            x = -x
        for _ in range(k):
            x, y = y, -x
        return np.stack([x, y], axis=1).astype(v.dtype)

    out = dict(sample)
    img = sample["image"][:, ::-1] if flip else sample["image"]
    out["image"] = np.ascontiguousarray(np.rot90(img, k))
    out["bin_xy"] = move_points(sample["bin_xy"])
    if "nbr_offset" in sample:
        out["nbr_offset"] = move_vectors(sample["nbr_offset"])
    perm = _spot_permutation(geometry, move_points)
    if "bin_spot" in sample:
        out["bin_spot"] = perm[sample["bin_spot"].astype(np.int64)].astype(sample["bin_spot"].dtype)
    for f in SPOT_FIELDS:
        if f in sample:
            moved = np.empty_like(sample[f])
            moved[:, perm] = sample[f]
            out[f] = moved
    return out

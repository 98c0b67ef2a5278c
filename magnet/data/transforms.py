"""Per-sample stages after the shuffle buffer: bin windowing or chunking, augmentation.

They act on :class:`magnet.format.sample.Sample` and derive what they do to each member from the
schema (:mod:`magnet.format.schema`): members whose first axis is ``BIN`` are cut with the bins;
``PIXEL`` axes are rotated, ``POINT`` and ``VECTOR`` values moved, ``SPOT`` axes and ``SPOT_INDEX``
values permuted with the spot cells. Coordinates are continuous pixel positions of the stored image
(pixel ``i`` spans ``[i, i + 1)``), so a flip maps ``x`` to ``side - x``.
"""

from __future__ import annotations

import numpy as np

from magnet.format.sample import Sample
from magnet.format.schema import Axis, Values, with_axis, with_values
from magnet.geometry import Geometry

PER_BIN = tuple(m.name for m in with_axis(Axis.BIN, 0))
IMAGES = tuple(m.name for m in with_axis(Axis.PIXEL, 0))
POINTS = tuple(m.name for m in with_values(Values.POINT))
VECTORS = tuple(m.name for m in with_values(Values.VECTOR))
SPOT_INDICES = tuple(m.name for m in with_values(Values.SPOT_INDEX))
PER_SPOT = tuple((m.name, m.axes.index(Axis.SPOT)) for m in with_axis(Axis.SPOT))


def take_bins(sample: Sample, idx: np.ndarray) -> Sample:
    return sample.replace(**{f: sample[f][idx] for f in PER_BIN if f in sample})


def window_bins(sample: Sample, cap: int, rng: np.random.Generator) -> Sample:
    """At most ``cap`` bins: a run of consecutive bins in stored (row-major) order from a random start.

    The same shape as the evaluation chunks (:func:`chunk_bins`), so MagNet's bin graph (kNN within each
    sample) links bins at the same distances in training as in evaluation and prediction; a random
    subset of the tile spread the bins out and the graph saw neighbours twice as far apart.
    """
    n = sample.n_bins
    if n <= cap:
        return sample
    start = int(rng.integers(n - cap + 1))
    return take_bins(sample, np.arange(start, start + cap))


def chunk_bins(sample: Sample, cap: int) -> list[Sample]:
    """All bins in pieces of at most ``cap`` (evaluation: every bin exactly once)."""
    n = sample.n_bins
    if n <= cap:
        return [sample]
    return [take_bins(sample, np.arange(i, min(i + cap, n))) for i in range(0, n, cap)]


def _spot_permutation(geometry: Geometry, fn) -> np.ndarray:
    """Where each spot cell goes when tile-local points move by ``fn``."""
    return geometry.spot_of(fn(geometry.spot_centres())).astype(np.int64)


def augment(sample: Sample, geometry: Geometry, rng: np.random.Generator) -> Sample:
    """A random flip and 90 degree rotation, applied to the image, bin and spot positions and neighbour offsets."""
    k, flip = int(rng.integers(4)), bool(rng.integers(2))
    if k == 0 and not flip:
        return sample
    side = float(geometry.image_px)  # the stored image side (also for samples read without their image)

    def move(xy: np.ndarray, shift: float) -> np.ndarray:  # shift = side: points; 0: vectors
        x, y = xy[:, 0], xy[:, 1]
        if flip:
            x = shift - x
        for _ in range(k):  # np.rot90 (counter-clockwise): new (x, y) = (y, side - x)
            x, y = y, shift - x
        return np.stack([x, y], axis=1).astype(xy.dtype)

    def rotate(img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.rot90(img[:, ::-1] if flip else img, k))

    out = {f: rotate(sample[f]) for f in IMAGES if f in sample}
    out.update({f: move(sample[f], side) for f in POINTS if f in sample})
    out.update({f: move(sample[f], 0.0) for f in VECTORS if f in sample})
    perm = _spot_permutation(geometry, lambda xy: move(xy, side))
    out.update({f: perm[sample[f].astype(np.int64)].astype(sample[f].dtype) for f in SPOT_INDICES if f in sample})
    for f, axis in PER_SPOT:
        if f in sample:
            moved = np.empty_like(sample[f])
            moved[(slice(None),) * axis + (perm,)] = sample[f]
            out[f] = moved
    return sample.replace(**out)

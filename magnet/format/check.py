"""The one check of a sample against the schema, with the sizes of its shard set (:class:`Dims`).

Used by the sharding writer (before a sample is written), the loader (after decoding, under the
``data.on_corrupt`` policy), ``magnet shard validate``, ``collate`` and the registry model's input.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from magnet.errors import UserError
from magnet.format.sample import Sample
from magnet.format.schema import FORMAT_VERSION, MEMBERS, Axis, Encoding, Values


@dataclasses.dataclass(frozen=True)
class Dims:
    """Sizes of the fixed axes: genes, neighbours + 1, spot cells, feature size, image side, field scales."""

    G: int
    K1: int
    S: int
    F: int
    P: int
    L: int = 0

    def size(self, axis: Axis, n_bins: int) -> int:
        return n_bins if axis is Axis.BIN else int(axis.value) if axis.value.isdigit() else getattr(self, axis.value)


def check_sample(sample: Sample, dims: Dims, where: str, *, stored: bool = False, image: bool = True,
                 finite: bool = True) -> None:
    """Raise a UserError naming ``where`` and the member on the first mismatch: a required member
    missing, a dtype or shape off the schema, a non-finite float (``finite``), a spot index outside
    ``[0, S)``. ``stored``: a sample as read from a shard, whose ``meta.n_bins`` and ``format_version``
    must also agree. ``image=False`` leaves the image out (the writer holds it encoded)."""
    n = sample.n_bins if "bin_xy" in sample else -1
    if stored:
        if sample.meta.format_version != FORMAT_VERSION:
            raise UserError(f"{where}.meta.json: format_version: {sample.meta.format_version} "
                            f"(this version reads format {FORMAT_VERSION})")
        n = sample.meta.n_bins
    for m in MEMBERS:
        if m.encoding is Encoding.IMAGE and not image:
            continue
        if m.name not in sample:
            if m.optional:
                continue
            raise UserError(f"{where}.{m.filename()}: missing")
        arr = sample[m.name]
        want = tuple(dims.size(a, n) for a in m.axes)
        if str(arr.dtype) != m.dtype or arr.shape != want:
            raise UserError(f"{where}.{m.filename()}: {arr.dtype} {arr.shape}, expected {m.dtype} {want}")
        if finite and arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise UserError(f"{where}.{m.filename()}: non-finite values")
        if m.values is Values.SPOT_INDEX and arr.size and (arr.min() < 0 or arr.max() >= dims.S):
            raise UserError(f"{where}.{m.filename()}: values must lie in [0, {dims.S})")

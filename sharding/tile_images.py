"""Global tile images read once per slide and kept encoded as in the shards (sharding and ``magnet predict``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from magnet.format.codec import encode_image


class EncodedTiles:
    """Global tile images read once: :meth:`read` takes a block of tiles ``(gx, gy)`` from the slide image
    (with margin, at the model pixel size) and appends each, encoded as in the shards, to an unlinked
    temporary file in ``folder``; :meth:`encoded` gives the ``i``-th tile's bytes back. Memory holds one
    block of decoded tiles. Used by the sharding stage and by ``magnet predict`` (features first, samples
    after)."""

    def __init__(self, image, geom, mpp_full: float, fmt: str, quality: int, folder: Path | None = None):
        self.image, self.geom, self.mpp_full, self.fmt, self.quality = image, geom, mpp_full, fmt, quality
        self.spill = tempfile.TemporaryFile(prefix="magnet-tiles-", dir=folder)
        self.spans: list[tuple[int, int]] = []
        self.seconds = {"image": 0.0, "encode": 0.0}  # reading and resampling; encoding

    def __enter__(self) -> "EncodedTiles":
        return self

    def __exit__(self, *exc) -> None:
        self.spill.close()

    def read(self, block) -> list[np.ndarray]:
        """Decoded images of the tiles ``(gx, gy)`` in ``block``, in order; their encoded bytes are kept."""
        g = self.geom
        t0 = time.perf_counter()
        imgs = [self.image.region(*g.tile_origin_px(int(gx), int(gy)), g.image_px, g.mpp, self.mpp_full)
                for gx, gy in block]
        t1 = time.perf_counter()
        self.spill.seek(0, 2)
        for img in imgs:
            data = encode_image(img, self.fmt, self.quality)
            self.spans.append((self.spill.tell(), len(data)))
            self.spill.write(data)
        self.seconds["image"] += t1 - t0
        self.seconds["encode"] += time.perf_counter() - t1
        return imgs

    def encoded(self, i: int) -> bytes:
        start, size = self.spans[i]
        self.spill.seek(start)
        return self.spill.read(size)

"""Write the full-resolution image as a tiled pyramidal BigTIFF from a generator of row blocks.

Level 0 is streamed tile by tile (a slide larger than memory can be written); the 2x-downsampled
level 1 is accumulated while streaming (a quarter of the bytes) and the smaller levels and the
Space Ranger hires / lowres PNGs are made from it. Slides whose side is at most 6000 px keep level 0
instead, since their hires image is the full-resolution one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tifffile
from PIL import Image

from magnet.spaceranger_layout import Outs

HIRES_MAX_PX = 6000
LOWRES_PX = 600


def half(img: np.ndarray) -> np.ndarray:
    """2x2 box downsample (an odd last row / column is dropped)."""
    h, w = img.shape[0] // 2, img.shape[1] // 2
    a = img[: 2 * h, : 2 * w].astype(np.uint16)
    return ((a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2] + 2) // 4).astype(np.uint8)


def _tiles(blocks: Iterable[np.ndarray], width: int, tile: int, sink) -> Iterator[np.ndarray]:
    """Cut row blocks (``tile`` rows each, the last may be shorter) into zero-padded tiles."""
    for block in blocks:
        sink(block)
        padded = np.zeros((tile, math.ceil(width / tile) * tile, 3), np.uint8)
        padded[: block.shape[0], :width] = block
        for x0 in range(0, width, tile):
            yield padded[:, x0 : x0 + tile]


def write_pyramid(path: Path, blocks: Iterable[np.ndarray], shape: tuple[int, int], mpp: float,
                  tile: int, compression: str, quality: int) -> tuple[np.ndarray, float]:
    """Write the TIFF; return (the hires image source, its scale against full resolution)."""
    height, width = shape
    keep_full = max(shape) <= HIRES_MAX_PX
    store = np.empty((height, width, 3) if keep_full else (height // 2, width // 2, 3), np.uint8)
    row = [0]

    def sink(block):
        h = block.shape[0]
        if keep_full:
            store[row[0] : row[0] + h] = block
        else:
            small = half(block)
            store[row[0] // 2 : row[0] // 2 + small.shape[0]] = small
        row[0] += h

    n_levels = 1 + max(1, int(math.log2(max(shape) / tile)))
    comp = None if compression == "none" else compression
    args = dict(tile=(tile, tile), photometric="rgb", compression=comp, metadata=None,
                resolutionunit="CENTIMETER", software=False)
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    per_cm = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(_tiles(blocks, width, tile, sink), shape=(height, width, 3), dtype=np.uint8,
                  subifds=n_levels - 1, resolution=(per_cm, per_cm), **args)
        level = store if not keep_full else half(store)
        for k in range(1, n_levels):
            if k > 1:
                level = half(level)
            tif.write(level, subfiletype=1, resolution=(per_cm / 2**k, per_cm / 2**k), **args)
    return store, 1.0 if keep_full else 0.5


def write_spatial_pngs(spatial: Path, source: np.ndarray, source_scale: float, full_side: int) -> dict:
    """Write tissue_hires_image.png and tissue_lowres_image.png; return their scale factors."""
    hires, scale = source, source_scale
    while max(hires.shape[:2]) > HIRES_MAX_PX:
        hires, scale = half(hires), scale / 2
    Image.fromarray(hires).save(Outs.image(spatial, "hires"), compress_level=1)
    low_scale = min(1.0, LOWRES_PX / full_side)
    size = (max(1, round(hires.shape[1] * low_scale / scale)), max(1, round(hires.shape[0] * low_scale / scale)))
    low = Image.fromarray(hires).resize(size, Image.Resampling.BOX)
    low.save(Outs.image(spatial, "lowres"), compress_level=1)
    return {"tissue_hires_scalef": scale, "tissue_lowres_scalef": low_scale}

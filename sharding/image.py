"""Lazy slide image access: square regions at the model pixel size, read on demand.

TIFF (tiled, pyramidal, BigTIFF, or plain) is read from the pyramid level nearest the model pixel
size without being coarser than it, decoding only the tiles under a region: a tiled level tile by
tile through tifffile, keeping recently decoded tiles (at most ``TILE_CACHE_MB``), other layouts
through tifffile's zarr store; memory does not grow with the slide. PNG / JPEG are small images read
whole. Grayscale images are refused; RGBA is converted to RGB. Outside the image is white.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from magnet.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".svs", ".ome.tif")
Image.MAX_IMAGE_PIXELS = None  # the user's own slide: no decompression-bomb guard


class SlideImage:
    """``region(x0, y0, size, mpp, mpp_full)``: (size, size, 3) uint8 at ``mpp`` um/px."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tif = None
        if self.path.suffix.lower() in TIFF_SUFFIXES:
            self._open_tiff()
        else:
            self._open_pil()

    def _grayscale(self, shape) -> UserError:
        return UserError(f"{self.path}: image: grayscale (shape {tuple(shape)}); an RGB H&E image is needed")

    def _open_tiff(self) -> None:
        # start-up time: the CLI imports this module
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except (tifffile.TiffFileError, OSError, IndexError) as e:
            raise UserError(f"{self.path}: image: not a readable TIFF ({type(e).__name__})") from None
        axes = series.axes
        if "S" not in axes or series.shape[axes.index("S")] not in (3, 4) or axes.replace("S", "") != "YX":
            raise self._grayscale(series.shape)
        self._planar = axes.index("S") == 0
        self._levels, self.size = [], None
        for i, level in enumerate(series.levels):
            h, w = (level.shape[1:] if self._planar else level.shape[:2])
            self.size = self.size or (w, h)
            page = level.pages[0] if len(level.pages) == 1 else None
            tiled = (isinstance(page, tifffile.TiffPage) and not self._planar and page.is_tiled
                     and page.tiledepth == 1 and page.dtype == np.uint8)
            reader = _Tiles(self._tif, page) if tiled else zarr.open(series.aszarr(level=i), mode="r")
            self._levels.append((self.size[0] / w, reader))

    def _open_pil(self) -> None:
        try:
            with Image.open(self.path) as im:
                if im.mode in ("L", "LA", "I", "I;16", "F", "1"):
                    raise self._grayscale((im.height, im.width))
                arr = np.asarray(im.convert("RGB"))
        except (OSError, Image.DecompressionBombError) as e:
            raise UserError(f"{self.path}: image: not a readable image ({type(e).__name__})") from None
        self.size = (arr.shape[1], arr.shape[0])
        self._levels = [(1.0, arr)]
        self._planar = False

    def _read(self, level, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Level pixels [y0:y1, x0:x1] as (h, w, 3), white where outside the level."""
        arr = level
        h, w = (arr.shape[1:3] if self._planar else arr.shape[:2])
        out = np.full((y1 - y0, x1 - x0, 3), 255, np.uint8)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx0 < cx1 and cy0 < cy1:
            try:
                if isinstance(arr, _Tiles):
                    block = arr.read(cx0, cy0, cx1, cy1)
                elif self._planar:
                    block = np.moveaxis(np.asarray(arr[:3, cy0:cy1, cx0:cx1]), 0, -1)
                else:
                    block = np.asarray(arr[cy0:cy1, cx0:cx1, :3])
            except Exception as e:  # codecs raise their own types for corrupt tiles
                raise UserError(f"{self.path}: image: cannot decode pixels x {cx0}-{cx1}, y {cy0}-{cy1} "
                                f"(corrupt or truncated: {type(e).__name__})") from None
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = block
        return out

    def region(self, x0: float, y0: float, size: int, mpp: float, mpp_full: float) -> np.ndarray:
        """The ``size`` px square whose top-left is model pixel (x0, y0); model px = full-res px * mpp_full / mpp."""
        # coarsest level that is not coarser than the model pixel size (never upsample a coarse level)
        down, arr = next(((d, a) for d, a in reversed(self._levels) if mpp_full * d <= mpp * 1.001), self._levels[0])
        scale = mpp / (mpp_full * down)  # level px per model px
        bx0, by0 = x0 * scale, y0 * scale
        bx1, by1 = (x0 + size) * scale, (y0 + size) * scale
        ix0, iy0, ix1, iy1 = math.floor(bx0) - 1, math.floor(by0) - 1, math.ceil(bx1) + 1, math.ceil(by1) + 1
        block = self._read(arr, ix0, iy0, ix1, iy1)
        if abs(scale - 1) < 1e-9 and float(x0).is_integer() and float(y0).is_integer():
            return block[1:1 + size, 1:1 + size].copy()
        box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
        return np.asarray(Image.fromarray(block).resize((size, size), Image.Resampling.BILINEAR, box=box))

    def full_resolution(self):
        """Level 0 as (c, y, x) RGB, a dask array whose chunks read only their own tiles (while open)."""
        import dask.array as da  # optional extra [spatialdata]

        arr = self._levels[0][1]
        if isinstance(arr, _Tiles):
            import zarr  # start-up time: the CLI imports this module

            arr = zarr.open(self._tif.series[0].aszarr(level=0), mode="r")
        chunks = (3, 1024, 1024) if self._planar else (1024, 1024, 3)
        lazy = da.from_array(arr, chunks=chunks if not isinstance(arr, np.ndarray) else -1, lock=True)
        return lazy[:3] if self._planar else lazy[..., :3].transpose(2, 0, 1)

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()

    def __enter__(self) -> "SlideImage":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


TILE_CACHE_MB = 192  # decoded TIFF tiles kept per level: about one row of regions' tiles plus the next's


class _Tiles:
    """One tiled, chunky 8-bit TIFF level read tile by tile, decoded tiles kept in a least-recently-used cache of
    ``TILE_CACHE_MB``: neighbouring regions share TIFF tiles (their margins, and tile borders that do not align
    with theirs), and tifffile's zarr store decodes every tile a slice touches each time it is sliced."""

    def __init__(self, tif, page):
        self.fh, self.page = tif.filehandle, page
        self.th, self.tw = page.tilelength, page.tilewidth
        self.shape = page.shape  # (h, w, samples)
        self.across = -(-self.shape[1] // self.tw)
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.max_tiles = max(1, TILE_CACHE_MB * 2**20 // (self.th * self.tw * 3))

    def read(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the level) as (h, w, 3)."""
        out = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        for ty in range(y0 // self.th, (y1 - 1) // self.th + 1):
            for tx in range(x0 // self.tw, (x1 - 1) // self.tw + 1):
                tile = self._tile(ty * self.across + tx)
                ty0, tx0 = ty * self.th, tx * self.tw
                sy0, sy1, sx0, sx1 = max(y0, ty0), min(y1, ty0 + self.th), max(x0, tx0), min(x1, tx0 + self.tw)
                out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = tile[sy0 - ty0:sy1 - ty0, sx0 - tx0:sx1 - tx0]
        return out

    def _tile(self, index: int) -> np.ndarray:
        tile = self.cache.get(index)
        if tile is not None:
            self.cache.move_to_end(index)
            return tile
        page, size = self.page, self.page.databytecounts[index]
        if size == 0:  # a tile the writer left out reads as the zarr store's fill value
            tile = np.zeros((self.th, self.tw, 3), np.uint8)
        else:
            self.fh.seek(page.dataoffsets[index])
            data = self.fh.read(size)  # before page.decode: building that function on first use reads the file
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = np.ascontiguousarray(segment.reshape(self.th, self.tw, -1)[..., :3])
        self.cache[index] = tile
        if len(self.cache) > self.max_tiles:
            self.cache.popitem(last=False)
        return tile


FULLRES_BLOCK_PX = 4096  # at most this many full-res px per side are decoded at a time


def thumbnail(image: SlideImage, mpp_full: float, mpp: float) -> np.ndarray:
    """The whole slide at ``mpp`` um/px, read block by block (memory: one block plus the result)."""
    w, h = (max(1, math.ceil(n * mpp_full / mpp)) for n in image.size)
    step = int(max(16, min(1024, FULLRES_BLOCK_PX * mpp_full / mpp)))
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, step):
        for x in range(0, w, step):
            block = image.region(x, y, step, mpp, mpp_full)
            out[y:y + step, x:x + step] = block[:min(step, h - y), :min(step, w - x)]
    return out

"""One encode and one decode between a :class:`Sample` and its tar members (``suffix -> bytes``).

Arrays are ``.npy`` without pickle compressed with zstd at a fixed level (frame checksums on),
images are encoded with fixed settings, ``meta.json`` has sorted keys: the same sample always gives
the same bytes.

Decoding is bounded: given the shape the schema and the manifest expect, a member decompresses to at
most that many bytes (plus the npy header) and its npy header must declare that shape before the array
is allocated, so a crafted member (a small zstd frame declaring gigabytes) is refused in one line.
"""

from __future__ import annotations

import io
import json

import numpy as np
import zstandard
from PIL import Image

from magnet.errors import UserError
from magnet.format.check import Dims
from magnet.format.sample import Meta, Sample
from magnet.format.schema import BY_NAME, META, MEMBERS, Encoding, member_of

ZSTD_LEVEL = 3
NPY_HEADER_MAX = 4096  # bytes allowed for a .npy header (numpy writes 128 for the schema's arrays)


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(buf.getvalue())


def decode_npy(data: bytes, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """The array of a ``.npy.zst`` member. With ``dtype`` and ``shape`` (what the schema expects) the frame
    may decode to at most that array's bytes plus the header, read as a stream that stops there, and the
    header must declare them before the array is read; a ValueError otherwise. Own bound: zstandard's
    one-shot ``decompress`` allocates the size a frame declares, and ``np.load`` the size its header declares."""
    if shape is None:
        return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)
    want = np.dtype(dtype)
    cap = NPY_HEADER_MAX + int(np.prod(shape, dtype=np.int64)) * want.itemsize
    declared = zstandard.frame_content_size(data)
    if declared > cap:
        raise ValueError(f"frame declares {declared} bytes, at most {cap} expected for {dtype} {shape}")
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        raw = reader.read(cap + 1)
    if len(raw) > cap:
        raise ValueError(f"decodes to more than {cap} bytes expected for {dtype} {shape}")
    fh = io.BytesIO(raw)
    version = np.lib.format.read_magic(fh)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    got_shape, fortran, got_dtype = read_header(fh)
    if got_shape != tuple(shape) or got_dtype != want or fortran:
        raise ValueError(f"npy header declares {got_dtype} {got_shape}, expected {dtype} {tuple(shape)}")
    fh.seek(0)
    return np.load(fh, allow_pickle=False)


def encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="WEBP", lossless=True, quality=80, method=4)
    return buf.getvalue()


def decode_image(data: bytes, side: int | None = None) -> np.ndarray:
    """RGB pixels of an image member; with ``side``, its header must declare ``side x side`` pixels before
    any pixel is decoded (a ValueError otherwise)."""
    with Image.open(io.BytesIO(data)) as im:
        if side is not None and im.size != (side, side):
            raise ValueError(f"image of {im.size[0]}x{im.size[1]} pixels, expected {side}x{side}")
        return np.asarray(im.convert("RGB"))


def encode_sample(sample: Sample, image: bytes, image_format: str) -> dict[str, bytes]:
    """The webdataset dict of a sample (``__key__`` and member suffix -> bytes); ``image`` is the tile
    image already encoded as ``image_format`` (sharding encodes each tile once for all bin sizes)."""
    out: dict = {"__key__": sample.key, BY_NAME["image"].filename(image_format): image,
                 META.filename(): json.dumps(sample.meta.to_dict(), sort_keys=True).encode()}
    for m in MEMBERS:
        if m.encoding is Encoding.NPY_ZST and m.name in sample.arrays:
            out[m.filename()] = encode_npy(np.asarray(sample.arrays[m.name], dtype=m.dtype))
    return out


def decode_sample(raw: dict, dims: Dims | None = None, max_bins: int | None = None) -> Sample:
    """A webdataset dict (``__key__``, ``__url__``, suffix -> bytes) -> :class:`Sample`. Raises a
    UserError naming shard, key and member for a member outside the format or one that cannot decode.
    With ``dims`` (the manifest's sizes) every member is decoded bounded by the shape the schema gives it
    for ``meta.n_bins`` bins, which must lie in ``[0, max_bins]`` (the shard's bins, from the manifest)."""
    url = raw.get("__url__", "?")
    arrays: dict[str, np.ndarray] = {}
    meta = None
    suffixes = sorted((s for s in raw if not s.startswith("__")), key=lambda s: member_of(s) is not META)
    for suffix in suffixes:  # meta.json first: it gives the bins every other member is bounded by
        data = raw[suffix]
        where = f"{url}: {raw['__key__']}.{suffix}"
        member = member_of(suffix)
        if member is None:
            raise UserError(f"{where}: not a member of the shard format")
        if member.name in arrays:
            raise UserError(f"{where}: member repeated")
        try:
            if member is META:
                meta = Meta.from_dict(json.loads(data))
                if dims is not None and (meta.n_bins < 0 or (max_bins is not None and meta.n_bins > max_bins)):
                    raise ValueError(f"n_bins {meta.n_bins}, the shard holds {max_bins} bins")
            elif dims is None:
                arrays[member.name] = decode_image(data) if member.encoding is Encoding.IMAGE else decode_npy(data)
            elif meta is None:
                raise UserError(f"{url}: {raw['__key__']}.{META.filename()}: missing")
            elif member.encoding is Encoding.IMAGE:
                arrays[member.name] = decode_image(data, dims.P)
            else:
                arrays[member.name] = decode_npy(data, member.dtype,
                                                 tuple(dims.size(a, meta.n_bins) for a in member.axes))
        except (ValueError, TypeError, OSError, zstandard.ZstdError, Image.DecompressionBombError) as e:
            # npy header, zstd frame, PIL, JSON; a size over what the schema allows
            raise UserError(f"{where}: cannot decode ({e})") from None
    if meta is None:
        raise UserError(f"{url}: {raw['__key__']}.{META.filename()}: missing")
    return Sample(meta=meta, arrays=arrays, url=url, index=int(raw.get("__index__", 0)))

"""One encode and one decode between a :class:`Sample` and its tar members (``suffix -> bytes``).

Arrays are ``.npy`` without pickle compressed with zstd at a fixed level (frame checksums on),
images are encoded with fixed settings, ``meta.json`` has sorted keys: the same sample always gives
the same bytes.
"""

from __future__ import annotations

import io
import json

import numpy as np

from magnet.errors import UserError
from magnet.format.sample import Meta, Sample
from magnet.format.schema import BY_NAME, META, MEMBERS, Encoding, member_of

ZSTD_LEVEL = 3


def encode_npy(arr: np.ndarray) -> bytes:
    import zstandard

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True).compress(buf.getvalue())


def decode_npy(data: bytes) -> np.ndarray:
    import zstandard

    return np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(data)), allow_pickle=False)


def encode_image(img: np.ndarray, fmt: str, quality: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(img)
    if fmt == "jpg":
        im.save(buf, format="JPEG", quality=quality, subsampling=0, optimize=True)
    elif fmt == "png":
        im.save(buf, format="PNG", compress_level=6)
    else:
        im.save(buf, format="WEBP", lossless=True, quality=80, method=4)
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
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


def decode_sample(raw: dict) -> Sample:
    """A webdataset dict (``__key__``, ``__url__``, suffix -> bytes) -> :class:`Sample`. Raises a
    UserError naming shard, key and member for a member outside the format or one that cannot decode."""
    import zstandard

    url = raw.get("__url__", "?")
    arrays: dict[str, np.ndarray] = {}
    meta = None
    for suffix, data in raw.items():
        if suffix.startswith("__"):
            continue
        where = f"{url}: {raw['__key__']}.{suffix}"
        member = member_of(suffix)
        if member is None:
            raise UserError(f"{where}: not a member of the shard format")
        if member.name in arrays:
            raise UserError(f"{where}: member repeated")
        try:
            if member is META:
                meta = Meta.from_dict(json.loads(data))
            elif member.encoding is Encoding.IMAGE:
                arrays[member.name] = decode_image(data)
            else:
                arrays[member.name] = decode_npy(data)
        except (ValueError, TypeError, OSError, zstandard.ZstdError) as e:  # npy header, zstd frame, PIL, JSON
            raise UserError(f"{where}: cannot decode ({e})") from None
    if meta is None:
        raise UserError(f"{url}: {raw['__key__']}.{META.filename()}: missing")
    return Sample(meta=meta, arrays=arrays, url=url, index=int(raw.get("__index__", 0)))

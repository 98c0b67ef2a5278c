"""The members of a shard sample, declared once: name, dtype, the kind of each axis, the encoding and
what the values are. Windowing, augmentation, validation and the registry model's signature derive
what they do to a member from these declarations."""

from __future__ import annotations

import dataclasses
import enum
import re

FORMAT_VERSION = 3  # 2: spot/global features centred on the slide (sharding/features.py); 3: the manifest's
# checksum and per-slide fingerprints (magnet/format/manifest.py, sharding/fingerprint.py)


class Axis(enum.Enum):
    """What an array axis runs over; its size comes from :class:`magnet.format.check.Dims`."""

    BIN = "n"  # the sample's bins (variable; windowing and chunking cut along it)
    NBR = "K1"  # the centre tile then its K neighbour tiles
    SPOT = "S"  # spot cells of a tile (augmentation permutes along it)
    GENE = "G"
    FEAT = "F"  # frozen-encoder feature size
    SCALE = "L"  # the feature field's scales (encoder.field_sd_um)
    PIXEL = "P"  # a side of the stored tile image (augmentation rotates along it)
    XY = "2"  # (x, y)
    RGB = "3"


class Values(enum.Enum):
    """What the numbers mean, where a geometric transform must change them."""

    DATA = "data"
    POINT = "point"  # tile-local pixel positions (x, y): rotate about the image centre
    VECTOR = "vector"  # offsets (x, y): rotate about the origin
    SPOT_INDEX = "spot_index"  # an index along Axis.SPOT: permute with the cells


class Encoding(enum.Enum):
    NPY_ZST = "npy.zst"  # .npy without pickle, zstd with frame checksums
    IMAGE = "image"  # jpg, png or webp (shard.image_format)
    JSON = "json"


@dataclasses.dataclass(frozen=True)
class Member:
    name: str
    dtype: str | None
    axes: tuple[Axis, ...]
    encoding: Encoding = Encoding.NPY_ZST
    values: Values = Values.DATA
    optional: bool = False

    def filename(self, image_format: str = "jpg") -> str:
        """The tar member suffix after ``{key}.``."""
        if self.encoding is Encoding.IMAGE:
            return f"{self.name}.{image_format}"
        return f"{self.name}.{self.encoding.value}"


B, K1, S, G, F, P, XY = Axis.BIN, Axis.NBR, Axis.SPOT, Axis.GENE, Axis.FEAT, Axis.PIXEL, Axis.XY
MEMBERS: tuple[Member, ...] = (
    Member("image", "uint8", (P, P, Axis.RGB), Encoding.IMAGE),
    Member("bin_xy", "float32", (B, XY), values=Values.POINT),
    Member("bin_rc", "int32", (B, XY)),
    Member("bin_spot", "int16", (B,), values=Values.SPOT_INDEX),
    Member("bin_expr", "float16", (B, G)),
    Member("bin_counts", "int32", (B, G), optional=True),  # raw counts of the genes (shard.keep_counts) ...
    Member("bin_libsize", "float32", (B,), optional=True),  # ... and of all genes: the count losses' exposure
    # the frozen encoder's feature of each bin's patch (encoder.bin_features; model.bin_input=features trains on it)
    Member("bin_feat", "float16", (B, F), optional=True),
    # the mean of the slide's bin features around each bin at each scale (encoder.field_sd_um; model.field reads it)
    Member("bin_field", "float16", (B, Axis.SCALE, F), optional=True),
    Member("spot_expr", "float16", (K1, S, G)),
    Member("spot_mask", "bool", (K1, S)),
    Member("spot_counts", "int32", (K1, S, G), optional=True),  # raw counts summed over all the cell's bins ...
    Member("spot_libsize", "float32", (K1, S), optional=True),  # ... and its exposure (shard.keep_counts)
    Member("spot_feat", "float16", (K1, S, F)),
    Member("global_expr", "float16", (K1, G)),
    Member("global_feat", "float16", (K1, F)),
    Member("global_counts", "int32", (K1, G), optional=True),  # the same for each whole tile (shard.keep_counts)
    Member("global_libsize", "float32", (K1,), optional=True),
    Member("nbr_offset", "float32", (K1, XY), values=Values.VECTOR),
    Member("nbr_mask", "bool", (K1,)),
)
# the manifest's ``raw_counts`` (shard.keep_counts): each level's raw counts and exposure, for the count likelihoods
RAW_COUNTS = {"counts": "bin_counts", "exposure": "bin_libsize", "spot_counts": "spot_counts",
              "spot_exposure": "spot_libsize", "global_counts": "global_counts", "global_exposure": "global_libsize"}
META = Member("meta", None, (), Encoding.JSON)  # decoded into Sample.meta, not an array
BY_NAME = {m.name: m for m in MEMBERS}
IMAGE_FORMATS = ("jpg", "png", "webp")

KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*__\d{5,}_\d{5,}$")  # samplesheet slide names, then the tile


def sample_key(slide: str, gx: int, gy: int) -> str:
    return f"{slide}__{gx:05d}_{gy:05d}"


def member_of(suffix: str) -> Member | None:
    """The member a tar name suffix (after ``{key}.``) stores, or None for a name outside the format."""
    name, _, enc = suffix.partition(".")
    if suffix == META.filename():
        return META
    m = BY_NAME.get(name)
    if m is None:
        return None
    ok = enc in IMAGE_FORMATS if m.encoding is Encoding.IMAGE else enc == m.encoding.value
    return m if ok else None


def with_axis(axis: Axis, position: int | None = None) -> tuple[Member, ...]:
    """Members having ``axis`` (at ``position``, when given)."""
    return tuple(m for m in MEMBERS if (axis in m.axes if position is None else
                                        len(m.axes) > position and m.axes[position] is axis))


def with_values(values: Values) -> tuple[Member, ...]:
    return tuple(m for m in MEMBERS if m.values is values)

"""The cohort samplesheet: ``slide,spaceranger,image[,split][,fold][,patient]`` (CSV, UTF-8 with or without a
byte-order mark). A slide name is at most :data:`MAX_SLIDE_NAME` characters, and no image or Space Ranger folder
is listed under two names.

Paths are relative to the samplesheet's folder (or absolute). ``spaceranger`` is a Space Ranger
``outs/`` folder (or the folder holding ``outs/``); ``image`` the full-resolution microscope image.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
from pathlib import Path

from magnet.errors import UserError
from magnet.spaceranger_layout import Outs

REQUIRED = ("slide", "spaceranger", "image")
SPLITS = ("train", "val", "test")
_SLIDE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no '.': webdataset keys end at the first dot
NAME_MAX = 255  # bytes in one file name on ext4, XFS, btrfs, ZFS, APFS, NTFS
# the longest name made from a slide's, '.{slide}.config.yaml.magnet-tmp-{pid}-{host}-{token}.tmp' (magnet/io.py),
# adds up to 110 bytes with a 64-byte host name
MAX_SLIDE_NAME = 128


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    slide: str
    spaceranger: Path  # the outs/ folder
    image: Path
    split: str | None = None
    fold: int | None = None
    patient: str | None = None


def read_samplesheet(path: str | Path, check_paths: bool = True) -> list[SlideEntry]:
    """The entries; ``check_paths=False`` leaves missing slide files to the caller (``magnet predict`` reports
    them per slide and predicts the others)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: samplesheet not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")  # -sig: a byte-order mark is not part of the header
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: encoding: not UTF-8 (byte 0x{data[e.start]:02x}; Latin-1 or another "
                        f"8-bit encoding?); save the samplesheet as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    for col in REQUIRED:
        if col not in columns:
            raise UserError(f"{path}: column '{col}' missing (have: {', '.join(columns)})")
    rows = list(reader)
    if not rows:
        raise UserError(f"{path}: no slides listed")
    entries, seen, files = [], set(), {}
    for i, row in enumerate(rows, start=2):
        where = f"{path}: line {i}"
        slide = (row["slide"] or "").strip()
        if not _SLIDE_NAME.match(slide):
            raise UserError(f"{where}: slide: '{slide}' must be letters, digits, '_' or '-' (no dots or spaces)")
        if len(slide.encode()) > MAX_SLIDE_NAME:
            raise UserError(f"{where}: slide: '{slide[:20]}...' has {len(slide)} characters; at most {MAX_SLIDE_NAME} "
                            f"(file names made from it must fit the file system's {NAME_MAX})")
        if slide in seen:
            raise UserError(f"{where}: slide: duplicate slide name '{slide}'")
        seen.add(slide)
        paths, given = {}, {}
        for col, kind in (("spaceranger", "folder"), ("image", "file")):
            value = (row[col] or "").strip()
            p = (path.parent / value).absolute()  # absolute: workers (Ray actors) run in other folders
            if not value or (check_paths and not (p.is_dir() if kind == "folder" else p.is_file())):
                raise UserError(f"{where} (slide {slide}): {col}: {kind} not found: {p}")
            paths[col], given[col] = p, value
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise UserError(f"{where} (slide {slide}): split: '{split}' is not one of {', '.join(SPLITS)}")
        fold_text = (row.get("fold") or "").strip()
        if fold_text and not fold_text.isdigit():
            raise UserError(f"{where} (slide {slide}): fold: '{fold_text}' is not a non-negative integer")
        for col in ("image", "spaceranger"):
            key = os.path.realpath(Outs.find(paths[col]).path if col == "spaceranger" else paths[col])
            other = files.setdefault((col, key), slide)
            if other != slide:
                raise UserError(f"{where} (slide {slide}): {col}: {given[col]} is also the {col} of slide '{other}'; "
                                f"one slide under two names could land in two splits")
        entries.append(SlideEntry(
            slide=slide, spaceranger=Outs.find(paths["spaceranger"]).path, image=paths["image"], split=split,
            fold=int(fold_text) if fold_text else None, patient=(row.get("patient") or "").strip() or None,
        ))
    return entries

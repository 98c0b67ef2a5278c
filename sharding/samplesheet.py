"""The cohort samplesheet: ``slide,spaceranger,image[,split][,fold][,patient]`` (CSV).

Paths are relative to the samplesheet's folder (or absolute). ``spaceranger`` is a Space Ranger
``outs/`` folder (or the folder holding ``outs/``); ``image`` the full-resolution microscope image.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

from magnet.errors import UserError

REQUIRED = ("slide", "spaceranger", "image")
SPLITS = ("train", "val", "test")
_SLIDE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # no '.': webdataset keys end at the first dot


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    slide: str
    spaceranger: Path  # the outs/ folder
    image: Path
    split: str | None = None
    fold: int | None = None
    patient: str | None = None


def _outs(path: Path) -> Path:
    return path / "outs" if not (path / "binned_outputs").is_dir() and (path / "outs").is_dir() else path


def read_samplesheet(path: str | Path, check_paths: bool = True) -> list[SlideEntry]:
    """The entries; ``check_paths=False`` leaves missing slide files to the caller (``magnet predict`` reports
    them per slide and predicts the others)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: samplesheet not found")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for col in REQUIRED:
            if col not in columns:
                raise UserError(f"{path}: column '{col}' missing (have: {', '.join(columns)})")
        rows = list(reader)
    if not rows:
        raise UserError(f"{path}: no slides listed")
    entries, seen = [], set()
    for i, row in enumerate(rows, start=2):
        where = f"{path}: line {i}"
        slide = (row["slide"] or "").strip()
        if not _SLIDE_NAME.match(slide):
            raise UserError(f"{where}: slide: '{slide}' must be letters, digits, '_' or '-' (no dots or spaces)")
        if slide in seen:
            raise UserError(f"{where}: slide: duplicate slide name '{slide}'")
        seen.add(slide)
        paths = {}
        for col, kind in (("spaceranger", "folder"), ("image", "file")):
            value = (row[col] or "").strip()
            p = (path.parent / value).absolute()  # absolute: workers (Ray actors) run in other folders
            if not value or (check_paths and not (p.is_dir() if kind == "folder" else p.is_file())):
                raise UserError(f"{where} (slide {slide}): {col}: {kind} not found: {p}")
            paths[col] = p
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            raise UserError(f"{where} (slide {slide}): split: '{split}' is not one of {', '.join(SPLITS)}")
        fold_text = (row.get("fold") or "").strip()
        if fold_text and not fold_text.isdigit():
            raise UserError(f"{where} (slide {slide}): fold: '{fold_text}' is not a non-negative integer")
        entries.append(SlideEntry(
            slide=slide, spaceranger=_outs(paths["spaceranger"]), image=paths["image"], split=split,
            fold=int(fold_text) if fold_text else None, patient=(row.get("patient") or "").strip() or None,
        ))
    return entries

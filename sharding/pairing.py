"""Is this the image Space Ranger was run on? One slide's ``outs/`` paired with another slide's H&E was sharded,
predicted and scored with exit 0 (PCC about 0). Space Ranger's ``tissue_lowres_image.png`` and
``tissue_hires_image.png`` are downscaled copies of the full-resolution image, so the pair is checked against
the smaller one that still has ``COMPARE_PX`` on its longest side (the lowres image of a full capture area,
decoded in milliseconds where the hires one takes seconds): the size through its scale factor, and the
content by the correlation of the two images' darkness at a common small scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from magnet.errors import UserError
from magnet.spaceranger_layout import Outs
from sharding.image import SlideImage, thumbnail

SIZE_TOLERANCE = 0.02  # relative; Space Ranger rounds the hires size
MIN_CORRELATION = 0.5  # synthetic: the same slide 0.99 (hires) or 0.94 (600 px lowres), turned by 180 degrees 0.25
COMPARE_PX = 512  # longest side of the comparison


def _darkness(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    small = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize(size, Image.Resampling.BOX)
    return 255.0 - np.asarray(small, np.float32).mean(-1)


def _reference(spatial: Path):
    """(path, scale) of the Space Ranger image to compare against, or None when there is none."""
    try:
        factors = json.loads((spatial / Outs.SCALEFACTORS).read_text())
    except (OSError, ValueError):
        return None  # read and reported by the bin reader, which needs it
    found = []
    for kind in ("lowres", "hires"):
        path, scale = Outs.image(spatial, kind), factors.get(f"tissue_{kind}_scalef")
        if path.is_file() and isinstance(scale, (int, float)) and scale > 0:
            found.append((path, scale))
            try:
                with Image.open(path) as im:  # the header only
                    if max(im.size) >= COMPARE_PX:
                        return path, scale
            except OSError:
                pass  # unreadable: decoding it below reports it
    return found[-1] if found else None


def check_pairing(image: SlideImage, spatial: Path) -> None:
    """Refuse ``image`` when it is not the full-resolution image behind ``spatial/tissue_{lowres,hires}_image.png``
    (``spatial/scalefactors_json.json`` gives the scales). Nothing to compare against: nothing is checked."""
    found = _reference(spatial)
    if found is None:
        return
    ref_path, scale = found
    with Image.open(ref_path) as im:
        ref = np.asarray(im.convert("RGB"))
    hh, hw = ref.shape[:2]
    ew, eh = hw / scale, hh / scale
    w, h = image.size
    if abs(w - ew) > SIZE_TOLERANCE * ew + 2 or abs(h - eh) > SIZE_TOLERANCE * eh + 2:
        raise UserError(f"{image.path}: image size: {w} x {h} px does not match the Space Ranger coordinates "
                        f"({ref_path.name} {hw} x {hh} at its scale factor {scale:g} implies about "
                        f"{ew:.0f} x {eh:.0f} px)")
    k = COMPARE_PX / max(hw, hh)
    size = (max(1, round(hw * k)), max(1, round(hh * k)))
    mine = _darkness(thumbnail(image, 1.0, max(1.0, 1.0 / (scale * k))), size)  # read near the comparison scale
    r = float(np.corrcoef(mine.ravel(), _darkness(ref, size).ravel())[0, 1])
    if not r >= MIN_CORRELATION:  # NaN (a blank image) is refused too
        raise UserError(f"{image.path}: image: does not look like {ref_path} (correlation {r:.2f} at {size[0]} x "
                        f"{size[1]} px, below {MIN_CORRELATION}); is it the image these Space Ranger outputs were made "
                        "from?")

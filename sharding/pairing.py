"""Is this the image Space Ranger was run on? One slide's ``outs/`` paired with another slide's H&E was sharded,
predicted and scored with exit 0 (PCC about 0). Space Ranger's ``tissue_hires_image.png`` is a downscaled copy of
the full-resolution image, so the pair is checked against it: the size through ``tissue_hires_scalef``, and the
content by the correlation of the two images' darkness at a common small scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from magnet.errors import UserError
from sharding.image import SlideImage, thumbnail

SIZE_TOLERANCE = 0.02  # relative; Space Ranger rounds the hires size
MIN_CORRELATION = 0.5  # the same slide scores above 0.99 on the synthetic cohorts, different slides below 0.2
COMPARE_PX = 512  # longest side of the comparison


def _darkness(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    small = Image.fromarray(np.ascontiguousarray(rgb[..., :3])).resize(size, Image.Resampling.BOX)
    return 255.0 - np.asarray(small, np.float32).mean(-1)


def check_pairing(image: SlideImage, spatial: Path) -> None:
    """Refuse ``image`` when it is not the full-resolution image behind ``spatial/tissue_hires_image.png``
    (``spatial/scalefactors_json.json`` gives the scale). Nothing to compare against: nothing is checked."""
    from PIL import Image

    hires = spatial / "tissue_hires_image.png"
    try:
        scale = json.loads((spatial / "scalefactors_json.json").read_text()).get("tissue_hires_scalef")
    except (OSError, ValueError):
        return  # read and reported by the bin reader, which needs it
    if not hires.is_file() or not isinstance(scale, (int, float)) or not scale > 0:
        return
    with Image.open(hires) as im:
        ref = np.asarray(im.convert("RGB"))
    hh, hw = ref.shape[:2]
    ew, eh = hw / scale, hh / scale
    w, h = image.size
    if abs(w - ew) > SIZE_TOLERANCE * ew + 2 or abs(h - eh) > SIZE_TOLERANCE * eh + 2:
        raise UserError(f"{image.path}: image size: {w} x {h} px does not match the Space Ranger coordinates "
                        f"({hires.name} {hw} x {hh} at tissue_hires_scalef {scale:g} implies about "
                        f"{ew:.0f} x {eh:.0f} px)")
    k = COMPARE_PX / max(hw, hh)
    size = (max(1, round(hw * k)), max(1, round(hh * k)))
    mine = _darkness(thumbnail(image, 1.0, max(1.0, 1.0 / (scale * k))), size)  # read near the comparison scale
    r = float(np.corrcoef(mine.ravel(), _darkness(ref, size).ravel())[0, 1])
    if not r >= MIN_CORRELATION:  # NaN (a blank image) is refused too
        raise UserError(f"{image.path}: image: does not look like {hires} (correlation {r:.2f} at {size[0]} x {size[1]} "
                        f"px, below {MIN_CORRELATION}); is it the image these Space Ranger outputs were made from?")

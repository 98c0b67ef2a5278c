"""H&E rendering with the Beer-Lambert model, one row block at a time.

Each pixel's optical density is ``c_H * v_H + c_E * v_E`` for hematoxylin and eosin stain vectors
``v`` (per-slide perturbed Ruifrok-Johnston vectors) and stain concentrations ``c``; its RGB value
is ``I0 * exp(-OD)``. Concentrations come from the extracellular background of the compartment
(collagen fibres in stroma) and from every cell: a nucleus (size, shape, orientation, hematoxylin
density and chromatin rim of its type) and a cytoplasm (radius, eosin density). Cells are stamped
into the block all at once per type (``np.bincount`` on flat indices): no per-cell Python loop.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from magnet.synth.tissue import MAX_SIZE, MORPH, TYPES, Cells, Fields

H_VECTOR = np.array([0.65, 0.70, 0.29])
E_VECTOR = np.array([0.07, 0.99, 0.11])
EDGE_UM = 0.35  # antialiasing width of nuclear borders
CYTO_EDGE_UM = 1.2  # cytoplasm fades out over this width
FIBRE_PERIOD_UM = 5.0
RBC = TYPES.index("rbc")


@dataclasses.dataclass
class Stain:
    hema: np.ndarray  # (3,) optical density per unit concentration
    eosin: np.ndarray
    glass: np.ndarray  # (3,) incident light I0
    noise_sd: float


def random_stain(rng: np.random.Generator) -> Stain:
    """Per-slide stain vectors and intensities (protocol and scanner variation)."""
    def vec(base):
        v = base * np.exp(rng.normal(0, 0.08, 3))
        return v / np.linalg.norm(v)

    hema = vec(H_VECTOR) * rng.uniform(0.8, 1.2)
    eosin = vec(E_VECTOR) * rng.uniform(0.75, 1.25)
    glass = rng.uniform(228, 248) + rng.normal(0, 3, 3)
    noise = float(rng.uniform(1.5, 3.0))
    return Stain(hema.astype(np.float32), eosin.astype(np.float32), glass.astype(np.float32), noise)


def _upsample(field: np.ndarray, res_um: float, ys_um: np.ndarray, xs_um: np.ndarray) -> np.ndarray:
    """Bilinear (separable) samples of a coarse field on the pixel grid ``ys x xs``."""
    def axis(coord, n):
        f = np.clip(coord / res_um, 0, n - 1.000001)
        i = np.floor(f).astype(np.int64)
        return i, (f - i).astype(np.float32)

    i, wy = axis(ys_um, field.shape[0])
    rows = field[i] * (1 - wy[:, None]) + field[i + 1] * wy[:, None]
    j, wx = axis(xs_um, field.shape[1])
    return rows[:, j] * (1 - wx) + rows[:, j + 1] * wx


def _stamp_radius_px(t: int, mpp: float) -> int:
    extent = max(MORPH["cyto_r"][t], MORPH["nuc_a"][t] + MORPH["offset"][t]) * MAX_SIZE
    return int(np.ceil(extent / mpp)) + 1


def _stamp_cells(cells: Cells, sel: slice, y0: int, mpp: float, canvas_shape, pad: int,
                 hema: np.ndarray, eosin: np.ndarray) -> None:
    """Add the nuclei (hematoxylin) and cytoplasms (eosin) of ``cells[sel]`` into flat canvases."""
    ctype = cells.type[sel]
    cw = canvas_shape[1]
    for t in np.unique(ctype):
        idx = np.flatnonzero(ctype == t) + sel.start
        r = _stamp_radius_px(int(t), mpp)
        o = np.arange(-r, r + 1, dtype=np.float32)
        cx, cy = cells.x[idx] / mpp - 0.5, cells.y[idx] / mpp - 0.5  # centre in pixel-index units
        ix, iy = np.rint(cx).astype(np.int64), np.rint(cy).astype(np.int64)
        dx = ((o[None, None, :] - (cx - ix)[:, None, None]) * mpp).astype(np.float32)
        dy = ((o[None, :, None] - (cy - iy)[:, None, None]) * mpp).astype(np.float32)
        ang = cells.angle[idx][:, None, None]
        size = cells.size[idx][:, None, None]
        c, s = np.cos(ang), np.sin(ang)
        u, v = dx * c + dy * s, dy * c - dx * s
        cr = MORPH["cyto_r"][t] * size
        dc = np.sqrt(u * u + (v / 0.85) ** 2) / cr
        cyto = np.clip((1 - dc) * cr / CYTO_EDGE_UM + 0.5, 0, 1)
        if t == RBC:  # biconcave disc: paler centre, no nucleus
            cyto *= 0.65 + 0.35 * np.minimum(dc * dc, 1)
            h_w = None
        else:
            a, b = MORPH["nuc_a"][t] * size, MORPH["nuc_b"][t] * size
            dn2 = ((u - MORPH["offset"][t] * size) / a) ** 2 + (v / b) ** 2
            nuc = np.clip((1 - np.sqrt(dn2)) * b / EDGE_UM + 0.5, 0, 1)
            rim = MORPH["rim"][t]
            h_w = MORPH["hema"][t] * nuc * (1 - rim + rim * np.minimum(dn2, 1))
            cyto *= 1 - 0.7 * nuc
        rows = iy - y0 + pad
        cols = ix + pad
        oi = np.arange(-r, r + 1)
        flat = ((rows[:, None, None] + oi[None, :, None]) * cw + (cols[:, None, None] + oi[None, None, :])).ravel()
        n = canvas_shape[0] * cw
        eosin += np.bincount(flat, weights=(MORPH["eosin"][t] * cyto).ravel(), minlength=n)
        if h_w is not None:
            hema += np.bincount(flat, weights=h_w.ravel(), minlength=n)


def render_blocks(cells: Cells, fields: Fields, stain: Stain, shape: tuple[int, int], mpp: float,
                  block_rows: int, seed: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Yield the RGB image (uint8) as row blocks of ``block_rows`` rows, top to bottom."""
    height, width = shape
    rmax = max(_stamp_radius_px(t, mpp) for t in range(len(TYPES)))
    pad = 2 * rmax + 2
    xs = (np.arange(width) + 0.5) * mpp
    for bi, y0 in enumerate(range(0, height, block_rows)):
        h = min(block_rows, height - y0)
        rng = np.random.default_rng((*seed, bi))
        ys = (np.arange(y0, y0 + h) + 0.5) * mpp
        canvas_shape = (h + 2 * pad, width + 2 * pad)
        hema = np.zeros(canvas_shape[0] * canvas_shape[1])
        eosin = np.zeros_like(hema)
        lo, hi = np.searchsorted(cells.y, [ys[0] - rmax * mpp, ys[-1] + rmax * mpp])
        if hi > lo:
            _stamp_cells(cells, slice(int(lo), int(hi)), y0, mpp, canvas_shape, pad, hema, eosin)
        crop = (slice(pad, pad + h), slice(pad, pad + width))
        hema = hema.reshape(canvas_shape)[crop].astype(np.float32)
        eosin = eosin.reshape(canvas_shape)[crop].astype(np.float32)
        res = fields.res_um
        wave = np.sin(_upsample(fields.fibre_phase, res, ys, xs) * (2 * np.pi / FIBRE_PERIOD_UM))
        fibre = _upsample(fields.fibre, res, ys, xs)
        eosin += _upsample(fields.eosin_bg, res, ys, xs) * (1 + 0.35 * fibre * wave)
        hema += _upsample(fields.hema_bg, res, ys, xs)
        hema *= 1 + 0.2 * rng.standard_normal((h, width), dtype=np.float32)
        np.minimum(eosin, 1.8, out=eosin)
        od = hema[..., None] * stain.hema + eosin[..., None] * stain.eosin
        rgb = stain.glass * np.exp(-od) + stain.noise_sd * rng.standard_normal((h, width, 3), dtype=np.float32)
        yield np.clip(rgb + 0.5, 0, 255).astype(np.uint8)

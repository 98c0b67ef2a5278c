"""Tissue architecture: compartments from smooth random fields, an irregular tissue mask, cells.

All geometry is in microns in the image frame (x to the right, y down, origin at the image's
top-left corner). Fields live on a coarse grid of ``field_res_um``; cells are placed on a jittered
lattice thinned by the density of their compartment, and their type is drawn from the
compartment's mix, so morphology (type) and architecture (neighbourhood) are tied together.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

from magnet.synth.config import TissueConfig

COMPARTMENTS = ("stroma", "tumour", "immune", "vessel_wall", "lumen")
GLASS = -1
TYPES = ("tumour", "fibroblast", "lymphocyte", "macrophage", "endothelial", "plasma", "rbc")
N_EXPRESSING = 6  # red blood cells (last) carry no transcripts
MAX_SIZE = 1.35  # largest per-cell size factor

# cells per 100 um^2 and the type mix (columns follow TYPES) of each compartment
DENSITY = np.array([0.55, 1.25, 3.0, 1.6, 4.0])
MIX = np.array([
    # tum   fib   lym   mac   endo  plas  rbc
    [0.02, 0.70, 0.12, 0.08, 0.03, 0.05, 0.00],  # stroma
    [0.86, 0.02, 0.07, 0.05, 0.00, 0.00, 0.00],  # tumour nest
    [0.00, 0.04, 0.78, 0.08, 0.02, 0.08, 0.00],  # immune aggregate
    [0.00, 0.15, 0.03, 0.02, 0.80, 0.00, 0.00],  # vessel wall
    [0.00, 0.00, 0.03, 0.00, 0.00, 0.00, 0.97],  # lumen
])
# morphology per type (microns, stain densities): nucleus semi-axes a >= b, hematoxylin density,
# rim (vesicular chromatin: density rises towards the nuclear membrane), cytoplasm radius and its
# eosin density, nucleus offset inside the cytoplasm (plasma cells: eccentric "clock-face" nucleus)
MORPH = {
    "nuc_a": np.array([4.6, 5.5, 2.7, 3.6, 5.0, 2.9, 0.0]),
    "nuc_b": np.array([3.7, 1.4, 2.5, 2.4, 1.2, 2.6, 0.0]),
    "hema": np.array([0.55, 0.95, 1.25, 0.6, 0.8, 1.0, 0.0]),
    "rim": np.array([0.55, 0.0, 0.0, 0.3, 0.0, 0.4, 0.0]),
    "cyto_r": np.array([7.5, 3.0, 3.4, 8.5, 3.0, 5.2, 3.6]),
    "eosin": np.array([0.38, 0.12, 0.12, 0.22, 0.1, 0.42, 1.15]),
    "offset": np.array([0.0, 0.0, 0.0, 0.8, 0.0, 2.0, 0.0]),
}
# extracellular background per compartment: eosin (collagen, fibre texture in stroma), hematoxylin
BACKGROUND_EOSIN = np.array([0.42, 0.16, 0.12, 0.3, 0.03])
BACKGROUND_HEMA = np.array([0.03, 0.05, 0.05, 0.03, 0.0])
FIBRE_WEIGHT = np.array([1.0, 0.2, 0.1, 0.6, 0.0])


@dataclasses.dataclass
class Fields:
    """Coarse maps over the slide (row = y, column = x), ``res_um`` apart, first sample at 0."""

    res_um: float
    tissue_score: np.ndarray  # float32; > 0 inside tissue (soft edge of width ~1)
    label: np.ndarray  # int8 compartment index, GLASS outside tissue
    eosin_bg: np.ndarray  # float32 extracellular eosin density (0 on glass)
    hema_bg: np.ndarray  # float32 extracellular hematoxylin density
    fibre: np.ndarray  # float32 weight of the fibre texture
    fibre_phase: np.ndarray  # float32 distance across fibres (um); stripes at its level lines
    orient: np.ndarray  # float32 local fibre / vessel direction (radians)


@dataclasses.dataclass
class Cells:
    """Cells sorted by y. Angles in radians; ``size`` scales every radius of the cell."""

    x: np.ndarray
    y: np.ndarray
    type: np.ndarray  # int8 index into TYPES
    size: np.ndarray
    angle: np.ndarray

    def __len__(self) -> int:
        return len(self.x)


def smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian random field with zero mean and unit sd, correlation length ``sigma_px``."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_px, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def _quantile_threshold(values: np.ndarray, where: np.ndarray, fraction: float) -> float:
    return float(np.quantile(values[where], 1.0 - fraction)) if where.any() else np.inf


def make_fields(cfg: TissueConfig, size_um: float, rng: np.random.Generator) -> Fields:
    res = cfg.field_res_um
    n = int(np.ceil(size_um / res)) + 2
    shape = (n, n)
    c = (np.arange(n) * res - size_um / 2) / (size_um / 2)
    r2 = c[:, None] ** 2 + c[None, :] ** 2
    # irregular mask: a broad blob, a rough edge, falling off towards the slide border
    score = (1.2 * smooth_field(rng, shape, min(size_um / 5, 300) / res)
             + 0.5 * smooth_field(rng, shape, 30 / res) - 3.0 * r2).astype(np.float32)
    thr = float(np.quantile(score, 1.0 - cfg.tissue_fraction))
    tissue_score = ((score - thr) / 0.15).astype(np.float32)
    inside = tissue_score > 0

    label = np.zeros(shape, np.int8)
    nest = smooth_field(rng, shape, cfg.nest_scale_um / res) + 0.3 * smooth_field(rng, shape, 12 / res)
    label[nest > _quantile_threshold(nest, inside, cfg.tumour_fraction)] = 1
    agg = smooth_field(rng, shape, 22 / res)
    label[(agg > _quantile_threshold(agg, inside & (label == 0), cfg.immune_fraction * 1.6)) & (label == 0)] = 2
    ves = np.abs(smooth_field(rng, shape, 45 / res))
    vthr = float(np.quantile(ves[inside], cfg.vessel_fraction))
    label[(ves < vthr) & (label != 2)] = 3
    label[ves < 0.45 * vthr] = 4
    label[~inside] = GLASS

    # fibres run along the level lines of a smooth field (phase in um across the fibres); vessel
    # cells along the contours of the vessel field
    fib = smooth_field(rng, shape, 40 / res)
    fy, fx = np.gradient(fib, res)
    phase = (fib / np.mean(np.hypot(fx, fy))).astype(np.float32)
    gy, gx = np.gradient(ndimage.gaussian_filter(ves, 1.0))
    orient = np.where(label >= 3, np.arctan2(gy, gx), np.arctan2(fy, fx)) + np.pi / 2
    lab = np.clip(label, 0, None)
    soft = np.clip(tissue_score + 0.5, 0, 1)
    eosin_bg = ndimage.gaussian_filter(BACKGROUND_EOSIN[lab] * soft, 0.7).astype(np.float32)
    hema_bg = ndimage.gaussian_filter(BACKGROUND_HEMA[lab] * soft, 0.7).astype(np.float32)
    fibre = ndimage.gaussian_filter(FIBRE_WEIGHT[lab] * soft, 0.7).astype(np.float32)
    return Fields(res, tissue_score, label, eosin_bg, hema_bg, fibre, phase, orient.astype(np.float32))


def sample_nearest(field: np.ndarray, res_um: float, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    i = np.clip(np.rint(y_um / res_um).astype(np.int64), 0, field.shape[0] - 1)
    j = np.clip(np.rint(x_um / res_um).astype(np.int64), 0, field.shape[1] - 1)
    return field[i, j]


def sample_bilinear(field: np.ndarray, res_um: float, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    coords = np.stack([np.ravel(y_um) / res_um, np.ravel(x_um) / res_um])
    out = ndimage.map_coordinates(field, coords, order=1, mode="nearest")
    return out.reshape(np.shape(x_um))


def place_cells(cfg: TissueConfig, fields: Fields, size_um: float, rng: np.random.Generator) -> Cells:
    s = cfg.cell_spacing_um
    n = int(size_um / s)
    gy, gx = np.meshgrid((np.arange(n) + 0.5) * s, (np.arange(n) + 0.5) * s, indexing="ij")
    x = (gx.ravel() + rng.uniform(-0.45, 0.45, gx.size) * s)
    y = (gy.ravel() + rng.uniform(-0.45, 0.45, gy.size) * s)
    comp = sample_nearest(fields.label, fields.res_um, x, y)
    keep = comp != GLASS
    x, y, comp = x[keep], y[keep], comp[keep].astype(np.int64)
    keep = rng.random(len(x)) < np.minimum(DENSITY[comp] * s * s / 100.0, 1.0)
    x, y, comp = x[keep], y[keep], comp[keep]
    cum = np.cumsum(MIX, axis=1)
    cum[:, -1] = 1.0
    ctype = (rng.random(len(x))[:, None] > cum[comp]).sum(axis=1).astype(np.int8)
    size = np.clip(np.exp(rng.normal(0.0, 0.12, len(x))), 0.75, MAX_SIZE)
    flow = sample_nearest(fields.orient, fields.res_um, x, y)
    aligned = np.isin(ctype, (TYPES.index("fibroblast"), TYPES.index("endothelial")))
    angle = np.where(aligned, flow + rng.normal(0, 0.2, len(x)), rng.uniform(0, np.pi, len(x)))
    order = np.argsort(y, kind="stable")
    return Cells(x[order], y[order], ctype[order], size[order].astype(np.float32), angle[order].astype(np.float32))

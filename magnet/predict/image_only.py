"""Image-only input: a low-resolution view of the slide, tissue detection on it, and bins laid on a
grid over the tissue (Space Ranger HD layout: ``array_row``/``array_col`` from the top-left corner,
barcodes ``s_008um_00012_00034-1``)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from sharding.samples import Bins, SlideImage, thumbnail


def otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]: maximises the between-class variance."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(hist.sum(), 1)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * centres)
    mt = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * (1 - w0))
    between[~np.isfinite(between)] = -1
    return float(edges[int(np.argmax(between)) + 1])


def tissue_mask(rgb: np.ndarray) -> np.ndarray:
    """Tissue where the HSV saturation exceeds its Otsu threshold (H&E is coloured, glass is grey/white)."""
    rgb = rgb.astype(np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    sat = np.divide(hi - lo, hi, out=np.zeros_like(hi), where=hi > 0)
    if sat.max() - sat.min() < 0.02:  # uniform: all glass or all tissue; call it glass
        return np.zeros(sat.shape, bool)
    return sat > otsu(sat)


def tissue_bins(image: SlideImage, mpp_full: float, bin_um: int, level_um: float, min_fraction: float,
                n_genes: int) -> tuple[Bins, np.ndarray]:
    """Bins of ``bin_um`` over the tissue; returns them (no counts) and the tissue mask at ``level_um``."""
    mask = tissue_mask(thumbnail(image, mpp_full, level_um))
    step = bin_um / mpp_full  # full-res px per bin
    n_cols, n_rows = (int(n // step) for n in image.size)
    # share of tissue per bin: mask pixels by the bin holding their centre; bins no pixel centre falls in
    # (mask coarser than the bins) take the mask pixel under their centre
    iy, ix = np.nonzero(np.ones_like(mask))
    r = np.floor((iy + 0.5) * level_um / bin_um).astype(np.int64)
    c = np.floor((ix + 0.5) * level_um / bin_um).astype(np.int64)
    inside = (r < n_rows) & (c < n_cols)
    flat = r[inside] * n_cols + c[inside]
    total = np.bincount(flat, minlength=n_rows * n_cols)
    tissue = np.bincount(flat, weights=mask.ravel()[inside], minlength=n_rows * n_cols)
    frac = np.divide(tissue, total, out=np.zeros(n_rows * n_cols), where=total > 0)
    rr, cc = np.divmod(np.arange(n_rows * n_cols), n_cols)
    empty = total == 0
    my = np.minimum(((rr[empty] + 0.5) * bin_um / level_um).astype(np.int64), mask.shape[0] - 1)
    mx = np.minimum(((cc[empty] + 0.5) * bin_um / level_um).astype(np.int64), mask.shape[1] - 1)
    frac[empty] = mask[my, mx]
    keep = np.flatnonzero(frac >= min_fraction)
    rc = np.stack([rr[keep], cc[keep]], 1).astype(np.int32)
    xy = (rc[:, ::-1].astype(np.float64) + 0.5) * step
    barcodes = np.array([f"s_{bin_um:03d}um_{a:05d}_{b:05d}-1" for a, b in rc], dtype=str)
    bins = Bins(barcodes=barcodes, rc=rc, xy=xy, libsize=np.zeros(len(keep)),
                counts=sp.csr_matrix((len(keep), n_genes), dtype=np.float32))
    return bins, mask

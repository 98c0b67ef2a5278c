"""Diagnostic: how far a closed-form read-out of the TRUE cell-type composition gets on a synthetic cohort.

For every bin of one bin size's shards, the cells of each type (from the slide's ``ground_truth/cells.parquet``)
are counted in squares centred on the bin: the bin itself, the bin patch (``bin_px``), and larger windows for
the neighbourhood (``--context-um``). A ridge regression (degree-2 polynomial of the standardised counts and
shares, alpha chosen by leave-one-slide-out on the training slides) maps them to the bin's targets (the shards'
``bin_expr``). Its per-gene PCC on a split, per gene group, is the read-out ceiling of a model that sees the
composition perfectly: ``bin`` features alone (what an ideal bin encoder gives), ``bin+context`` (what ideal
context features add). Bin squares are axis-aligned (the synthetic bin grid turns by at most 1 degree).

    python bench/ceiling_probe.py --shards SHARDS/16um --cohort SLIDES --split val
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from scipy import ndimage
from sklearn.cluster import MiniBatchKMeans
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnet.batch import crop_patches  # noqa: E402
from magnet.format.manifest import Manifest  # noqa: E402
from magnet.format.reader import ShardReader  # noqa: E402
from magnet.synth.config import ExpressionConfig  # noqa: E402
from magnet.synth.expression import TYPE_PREFIX  # noqa: E402
from magnet.synth.tissue import MORPH, TYPES  # noqa: E402

ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 1e4, 1e5)
DIFFUSION_UM = ExpressionConfig().diffusion_um  # the context benchmark keeps the default


class BoxCounts:
    """Cells of each type whose centre lies in axis-aligned squares (um), from a 1 um cumulative grid; with
    ``mass``, each cell counts ``size**2`` (its library) spread as its transcripts are (a Gaussian of sd
    ``sqrt((cyto_r * size / 2)**2 + diffusion**2)``, taken at size 1): the bin's expected transcript mass
    per type, the local oracle's input up to the type profiles."""

    def __init__(self, cells_path: Path, mass: bool = False):
        t = pq.read_table(cells_path).to_pandas()
        types = t.cell_type.map({n: i for i, n in enumerate(TYPES)}).to_numpy()
        n = int(np.ceil(max(t.x_um.max(), t.y_um.max()))) + 2
        grid = np.zeros((len(TYPES), n + 1, n + 1), np.float64)
        weight = t["size"].to_numpy() ** 2 if mass else np.ones(len(t))
        np.add.at(grid, (types, t.y_um.to_numpy().astype(int) + 1, t.x_um.to_numpy().astype(int) + 1), weight)
        if mass:
            for k in range(len(TYPES)):
                sd = np.sqrt((MORPH["cyto_r"][k] / 2) ** 2 + DIFFUSION_UM**2)
                grid[k, 1:, 1:] = ndimage.gaussian_filter(grid[k, 1:, 1:], sd, mode="constant")
        self.cum, self.n = grid.cumsum(1).cumsum(2), n

    def __call__(self, x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
        """(N, len(TYPES)) counts in the squares of ``side`` um centred on (x, y) um."""
        def idx(v, d):
            return np.clip(np.round(v + d).astype(int), 0, self.n)
        i0, i1, j0, j1 = idx(y, -side / 2), idx(y, side / 2), idx(x, -side / 2), idx(x, side / 2)
        c = self.cum
        return (c[:, i1, j1] - c[:, i0, j1] - c[:, i1, j0] + c[:, i0, j0]).T.astype(np.float64)


def bin_table(shards: Path, cohort: Path, windows: list[float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """slide -> (transcript mass in the bin, then counts per window: (N, 1 + len(windows), len(TYPES)),
    targets (N, G)), in stored order."""
    typed = Manifest.load(shards / "manifest.json")
    geom, reader = typed.geometry, ShardReader(typed)
    mpp = geom.mpp
    out: dict[str, list] = {}
    for shard in typed.to_dict()["shards"]:
        slide = shard["slide"]
        counts = BoxCounts(cohort / slide / "ground_truth" / "cells.parquet")
        mass = BoxCounts(cohort / slide / "ground_truth" / "cells.parquet", mass=True)
        for s in reader.read([str(shards / shard["name"])]):
            x0, y0 = s.meta.gx * geom.global_px * mpp, s.meta.gy * geom.global_px * mpp
            xy = (s["bin_xy"].astype(np.float64) - geom.margin) * mpp
            x, y = x0 + xy[:, 0], y0 + xy[:, 1]
            feats = np.stack([mass(x, y, windows[0])] + [counts(x, y, w) for w in windows], axis=1)
            out.setdefault(slide, []).append((feats, s["bin_expr"].astype(np.float32)))
    return {k: tuple(np.concatenate(a) for a in zip(*v)) for k, v in out.items()}


def colour_table(shards: Path, k: int, seed: int = 0) -> dict[str, np.ndarray]:
    """slide -> (N, 2, k) shares of the patch's pixels in each of ``k`` colour clusters (k-means on a pixel
    sample of every slide), in the bin square and in the whole patch: what a read-out of the image's colours
    alone can give, with no learned shape."""
    typed = Manifest.load(shards / "manifest.json")
    geom, reader, mpp = typed.geometry, ShardReader(typed), typed.geometry.mpp
    bin_px, size = int(round(typed.to_dict()["bin_um"] / mpp)), geom.bin_px
    patches: dict[str, list] = {}
    for shard in typed.to_dict()["shards"]:
        for s in reader.read([str(shards / shard["name"])]):
            out = np.empty((s.n_bins, size, size, 3), np.uint8)
            crop_patches(s["image"], s["bin_xy"].astype(np.float32), out)
            patches.setdefault(shard["slide"], []).append(out)
    patches = {k_: np.concatenate(v) for k_, v in patches.items()}
    rng = np.random.default_rng(seed)
    pixels = np.concatenate([p.reshape(-1, 3)[rng.integers(0, p.shape[0] * size * size, 20000)]
                             for p in patches.values()]).astype(np.float32)
    km = MiniBatchKMeans(k, random_state=seed, n_init=3).fit(pixels)
    lo = (size - bin_px) // 2
    out = {}
    for slide, p in patches.items():
        lab = km.predict(p.reshape(-1, 3).astype(np.float32)).reshape(p.shape[:3])
        whole = np.stack([(lab == c).mean((1, 2)) for c in range(k)], axis=1)
        inner = lab[:, lo:lo + bin_px, lo:lo + bin_px]
        centre = np.stack([(inner == c).mean((1, 2)) for c in range(k)], axis=1)
        out[slide] = np.stack([centre, whole], axis=1)
    return out


def gene_groups(cohort: Path, slide: str, genes: list[str]) -> np.ndarray:
    """The group of each of ``genes`` (marker, context_short, ...; "other" when unlisted) from a synthetic slide's
    ``ground_truth/gene_groups.csv``."""
    with open(cohort / slide / "ground_truth" / "gene_groups.csv", newline="") as f:
        groups = {r["gene"]: r["group"] for r in csv.DictReader(f)}
    return np.array([groups.get(g, "other") for g in genes])


def marker_types(genes: list[str], group: np.ndarray) -> dict[str, np.ndarray]:
    """Marker gene columns by the cell type that expresses them (the generator names a type's markers by its prefix)."""
    out = {}
    for kind, prefix in zip(TYPES, TYPE_PREFIX):
        cols = np.flatnonzero([g.startswith(prefix) and k == "marker" for g, k in zip(genes, group)])
        if len(cols):
            out[kind] = cols
    return out


def type_line(pcc: np.ndarray, types: dict[str, np.ndarray]) -> str:
    """The markers' mean PCC per cell type, as one indented line."""
    return "    markers by type: " + ", ".join(f"{k} {np.nanmean(pcc[c]):.3f}" for k, c in types.items())


def design(counts: np.ndarray) -> np.ndarray:
    """Counts and shares of every window, flattened: (N, windows * 2 * types)."""
    shares = counts / np.maximum(counts.sum(-1, keepdims=True), 1.0)
    return np.concatenate([counts, shares], axis=-1).reshape(len(counts), -1)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    xm, ym = x.mean(0), y.mean(0)
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w, ym - xm @ w


def gene_pcc(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    p, t = pred - pred.mean(0), true - true.mean(0)
    return (p * t).sum(0) / np.sqrt((p * p).sum(0) * (t * t).sum(0) + 1e-12)


def fit(train: list[tuple[np.ndarray, np.ndarray]]):
    """A scaler + polynomial + ridge fitted on the training slides, alpha by leave-one-slide-out mean PCC."""
    def prep(xs):
        return np.concatenate(xs)

    def make(xs, ys, alpha):
        scaler = StandardScaler().fit(prep(xs))
        poly = PolynomialFeatures(2, include_bias=False)
        z = poly.fit_transform(scaler.transform(prep(xs)))
        w, b = ridge(z, prep(ys), alpha)
        return lambda x: poly.transform(scaler.transform(x)) @ w + b

    xs, ys = [d[0] for d in train], [d[1] for d in train]
    score = {}
    for alpha in ALPHAS:
        folds = []
        for i in range(len(xs)):
            f = make(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:], alpha)
            folds.append(np.nanmean(gene_pcc(f(xs[i]), ys[i])))
        score[alpha] = float(np.mean(folds))
    best = max(score, key=score.get)
    return make(xs, ys, best), best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path, help="one bin size's shard folder (manifest.json)")
    ap.add_argument("--cohort", required=True, type=Path, help="the magnet synth folder the shards came from")
    ap.add_argument("--split", default="val")
    ap.add_argument("--wider-um", nargs="*", type=float, default=[32.0, 40.0],
                    help="sides of windows wider than the bin patch: does a larger patch see more of the bin's cells")
    ap.add_argument("--context-um", nargs="+", type=float, default=[64.0, 128.0, 256.0],
                    help="sides of the neighbourhood windows of the bin+context read-out")
    ap.add_argument("--colours", type=int, default=0,
                    help="also a read-out of the patch's colours: shares of this many colour clusters (0: none)")
    ap.add_argument("--mlp", action="store_true",
                    help="an MLP read-out of the bin + context features instead of the ridge rows")
    ap.add_argument("--colours-only", action="store_true", help="skip the composition read-outs")
    ap.add_argument("--squares-um", nargs="*", type=float, default=[],
                    help="also read-outs of the cells in one square of each side, the bin not told apart (what a CNN "
                         "pooled over its whole patch sees at best)")
    ap.add_argument("--by-type", action="store_true", help="also the markers' PCC per cell type under each read-out")
    args = ap.parse_args()
    typed = Manifest.load(args.shards / "manifest.json")
    bin_um, patch_um = typed.to_dict()["bin_um"], typed.geometry.bin_px * typed.geometry.mpp
    windows = [float(bin_um), patch_um, *args.wider_um, *args.context_um, *args.squares_um]
    table = bin_table(args.shards, args.cohort, windows)
    splits = typed.splits
    slides = sorted(s for s, v in splits.items() if v == args.split)
    group = gene_groups(args.cohort, slides[0], typed.genes)
    names = sorted(set(group))
    print(f"bins: {bin_um} um, patch {patch_um:g} um, windows {windows}; split {args.split}: {slides}")
    print("read-out".ljust(34), "all".rjust(6), *(f"{k}({(group == k).sum()})".rjust(18) for k in names))
    n_wide = len(args.wider_um)
    reads = [("bin (cells in bin)", [1]), ("bin (cells in bin, patch)", [1, 2])]
    reads += [(f"bin (cells in bin ... {w:g} um)", list(range(1, 3 + i + 1))) for i, w in enumerate(args.wider_um)]
    n_sq = len(args.squares_um)
    context_cols = [0, 1, 2, *range(3 + n_wide, len(windows) + 1 - n_sq)]
    reads += [("bin (transcript mass)", [0]), ("bin + context", context_cols)]
    first_sq = len(windows) + 1 - n_sq
    reads += [(f"one {w:g} um square (bin not apart)", [first_sq + i]) for i, w in enumerate(args.squares_um)]
    types = marker_types(typed.genes, group)
    for label, cols in reads if not (args.colours_only or args.mlp) else []:
        train = [(design(table[s][0][:, cols]), table[s][1]) for s in sorted(splits) if splits[s] == "train"]
        f, alpha = fit(train)
        pcc = np.mean([gene_pcc(f(design(table[s][0][:, cols])), table[s][1]) for s in slides], axis=0)
        print(f"{label} a={alpha:g}".ljust(34), f"{np.nanmean(pcc):6.3f}",
              *(f"{np.nanmean(pcc[group == k]):18.3f}" for k in names))
        if args.by_type:
            print(type_line(pcc, types))
    if args.mlp:  # is the ridge's smooth read-out what caps the composition? a flexible one on the same features
        cols = context_cols
        xs = [design(table[s][0][:, cols]) for s in sorted(splits) if splits[s] == "train"]
        ys = [table[s][1] for s in sorted(splits) if splits[s] == "train"]
        scaler = StandardScaler().fit(np.concatenate(xs))
        net = MLPRegressor(hidden_layer_sizes=(256, 256), alpha=1e-3, early_stopping=True, max_iter=300, random_state=0)
        net.fit(scaler.transform(np.concatenate(xs)), np.concatenate(ys))
        pcc = np.mean([gene_pcc(net.predict(scaler.transform(design(table[s][0][:, cols]))), table[s][1])
                       for s in slides], axis=0)
        print("bin + context, MLP".ljust(34), f"{np.nanmean(pcc):6.3f}",
              *(f"{np.nanmean(pcc[group == k]):18.3f}" for k in names))
    if args.colours:
        colours = colour_table(args.shards, args.colours)
        train = [(colours[s].reshape(len(colours[s]), -1), table[s][1]) for s in sorted(splits) if splits[s] == "train"]
        f, alpha = fit(train)
        pcc = np.mean([gene_pcc(f(colours[s].reshape(len(colours[s]), -1)), table[s][1]) for s in slides], axis=0)
        print(f"image colours (k={args.colours}) a={alpha:g}".ljust(34), f"{np.nanmean(pcc):6.3f}",
              *(f"{np.nanmean(pcc[group == k]):18.3f}" for k in names))


if __name__ == "__main__":
    main()

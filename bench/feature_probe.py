"""Diagnostic: how much of a bin's expression its cached frozen feature (``bin_feat``) holds, read out alone.

Reads the stored bin features and targets of the training and validation slides of one or more shard folders
(the same cohort and bin size, e.g. sharded with two tuned encoders), matches the bins by their position on the
slide, and fits read-outs of the bin alone on the training slides, scored on the validation slide (per-gene PCC):

- a ridge regression on the standardised features, alpha by leave-one-slide-out on the training slides;
- with ``--concat``: the same on the features of every shard folder side by side;
- with ``--mlp``: a one-hidden-layer MLP (scikit-learn, early stopping), to tell whether a linear read-out limits;
- with ``--neighbours-um R``: ridge on the bin's feature and the mean feature of the bins within R um of it (both
  on the first ``NEIGHBOUR_PCA`` principal components of the training features): what smoothing the neighbours'
  cached features over a disc gives, against a context model;
- with ``--field-sd-um SD ...``: ridge on the bin's feature and its field (``sharding/feature_field.py``, what
  ``encoder.field_sd_um`` stores, on the same principal components) less the slide's mean, and kept whole;
- with ``--by-type`` (and ``--cohort``): the markers' per-gene PCC of each folder's ridge averaged per cell type;
- with ``--views 8``: the feature recomputed as the mean over the 8 flips and quarter turns of the patch (the
  encoder of the first folder, ``tuned_encoder.safetensors`` next to it or ``--encoder-weights``): test-time
  augmentation of the cache.

    python bench/feature_probe.py --shards context/shards_tuned/16um context/shards_tuned_p64/16um --concat --mlp
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.ceiling_probe import gene_groups, gene_pcc as per_gene_pcc, marker_types, type_line  # noqa: E402
from magnet.batch import crop_patches  # noqa: E402
from magnet.format.manifest import Manifest  # noqa: E402
from magnet.format.reader import ShardReader  # noqa: E402
from magnet.models.ridge import fit_ridge  # noqa: E402
from sharding.feature_field import feature_field  # noqa: E402

ALPHAS = (1.0, 10.0, 100.0, 1e3, 1e4, 3e4)
NEIGHBOUR_PCA = 32  # components of the --neighbours-um read-out (the bin alone is scored on the same ones)


def dihedral(patches: np.ndarray) -> list[np.ndarray]:
    """The 8 flips and quarter turns of (n, px, px, 3) patches."""
    views = []
    for k in range(4):
        r = np.rot90(patches, k, axes=(1, 2))
        views += [np.ascontiguousarray(r), np.ascontiguousarray(r[:, :, ::-1])]
    return views


def view_mean(extractor, patches: np.ndarray) -> np.ndarray:
    """(n, F) mean feature of ``extractor`` (:class:`sharding.features.FeatureExtractor`) over the 8 views."""
    return np.mean([extractor.encode(v).astype(np.float32) for v in dihedral(patches)], axis=0)


def load(folder: Path, extractor=None) -> dict[str, dict[str, np.ndarray]]:
    """slide -> {"split", "feat" (n, F), "expr" (n, G), "pos" (n, 2) px on the slide}, training and validation
    slides only; with ``extractor``, "feat" is the mean feature over the 8 views of each bin patch."""
    typed = Manifest.load(folder / "manifest.json")
    geom, reader, out = typed.geometry, ShardReader(typed), {}
    for shard in typed.to_dict()["shards"]:
        if shard["split"] not in ("train", "val"):
            continue
        for s in reader.read([str(folder / shard["name"])]):
            feat = s["bin_feat"].astype(np.float32)
            if extractor is not None:
                patches = np.empty((s.n_bins, geom.bin_px, geom.bin_px, 3), np.uint8)
                crop_patches(s["image"], s["bin_xy"].astype(np.float32), patches)
                feat = view_mean(extractor, patches)
            pos = s["bin_xy"].astype(np.float64) - geom.margin + [s.meta.gx * geom.global_px, s.meta.gy * geom.global_px]
            d = out.setdefault(shard["slide"], {"split": shard["split"], "feat": [], "expr": [], "pos": []})
            d["feat"].append(feat), d["expr"].append(s["bin_expr"].astype(np.float32)), d["pos"].append(pos)
    return {k: {**v, **{m: np.concatenate(v[m]) for m in ("feat", "expr", "pos")}} for k, v in out.items()}


def align(ref: dict, other: dict) -> dict:
    """``other``'s bins in ``ref``'s order (same slides, same bin centres to 0.5 px)."""
    out = {}
    for slide, d in ref.items():
        dist, order = cKDTree(other[slide]["pos"]).query(d["pos"])
        if dist.max() > 0.5 or not np.allclose(other[slide]["expr"][order], d["expr"], atol=1e-2):
            raise SystemExit(f"{slide}: the shard folders hold different targets for the same bins")
        out[slide] = {**other[slide], **{m: other[slide][m][order] for m in ("feat", "expr", "pos")}}
    return out


def gene_pcc(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.nanmean(per_gene_pcc(pred, true)))


def ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    """Ridge on the standardised features; ``alpha`` weighs the penalty against the summed (not mean) error."""
    mean, sd = x.mean(0), x.std(0) + 1e-6
    w, b = fit_ridge((x - mean) / sd, y, alpha / len(x))
    return lambda q: ((q - mean) / sd) @ w + b


def by_group(pred: np.ndarray, true: np.ndarray, group: np.ndarray | None) -> str:
    """The per-gene PCC averaged over each gene group (``--cohort``'s gene_groups.csv), or nothing."""
    if group is None:
        return ""
    pcc = per_gene_pcc(pred, true)
    return " (" + ", ".join(f"{k} {np.nanmean(pcc[group == k]):.3f}" for k in sorted(set(group))) + ")"


def score(feats: dict[str, np.ndarray], expr: dict[str, np.ndarray], splits: dict[str, str], mlp: bool,
          group: np.ndarray | None = None, types: dict[str, np.ndarray] | None = None) -> str:
    """The read-outs' validation per-gene PCC as text; ``types`` (cell type -> marker columns): and the ridge's
    markers by type on a second line."""
    train = [s for s in feats if splits[s] == "train"]
    val = next(s for s in feats if splits[s] == "val")
    if len(train) < 2:
        raise SystemExit(f"the ridge's alpha is chosen leaving one training slide out: need 2 or more, got {train}")

    def stack(names, d):
        return np.concatenate([d[n] for n in names])

    loso = {}
    for alpha in ALPHAS:
        loso[alpha] = np.mean([gene_pcc(ridge(stack([t for t in train if t != h], feats),
                                               stack([t for t in train if t != h], expr), alpha)(feats[h]), expr[h])
                               for h in train])
    alpha = max(loso, key=loso.get)
    pred = ridge(stack(train, feats), stack(train, expr), alpha)(feats[val])
    text = f"ridge (alpha {alpha:g}) {gene_pcc(pred, expr[val]):.4f}{by_group(pred, expr[val], group)}"
    typed = f"\n{type_line(per_gene_pcc(pred, expr[val]), types)}" if types else ""
    if mlp:
        scaler = StandardScaler().fit(stack(train, feats))
        ym = stack(train, expr).mean(0)
        net = MLPRegressor(hidden_layer_sizes=(256,), alpha=10.0, early_stopping=True, random_state=0, max_iter=200)
        net.fit(scaler.transform(stack(train, feats)), stack(train, expr) - ym)
        pred = net.predict(scaler.transform(feats[val])) + ym
        text += f"  mlp {gene_pcc(pred, expr[val]):.4f}{by_group(pred, expr[val], group)}"
    return text + typed


def components(data: dict) -> dict[str, np.ndarray]:
    """Each slide's features as the first ``NEIGHBOUR_PCA`` principal components of the training slides'."""
    train = np.concatenate([d["feat"] for d in data.values() if d["split"] == "train"])
    mean = train.mean(0)
    basis = np.linalg.svd(train - mean, full_matrices=False)[2][:NEIGHBOUR_PCA].T
    return {slide: (d["feat"] - mean) @ basis for slide, d in data.items()}


def with_field(data: dict, mpp: float, sd_um: list[float], bin_um: float, whole: bool = False) -> dict:
    """The bin's components and their field at each of ``sd_um`` (less the slide's mean, as the shards store it;
    ``whole``: with the slide's mean added back), slide by slide."""
    out = {}
    for slide, f in components(data).items():
        field = feature_field(data[slide]["pos"] * mpp, f, sd_um, bin_um).astype(np.float64).reshape(len(f), -1)
        out[slide] = np.concatenate([f, field + (np.tile(f.mean(0), len(sd_um)) if whole else 0.0)], axis=1)
    return out


def with_neighbours(data: dict, mpp: float, radii_um: list[float]) -> tuple[dict, dict]:
    """(bin alone, bin and the mean over each disc of ``radii_um``) as the first ``NEIGHBOUR_PCA`` principal
    components of the training slides' features, slide by slide (a disc holds the bin itself)."""
    alone, both = {}, {}
    for slide, f in components(data).items():
        d = data[slide]
        tree = cKDTree(d["pos"] * mpp)
        discs = [np.stack([f[i].mean(0) for i in tree.query_ball_point(d["pos"] * mpp, r)]) for r in radii_um]
        alone[slide], both[slide] = f, np.concatenate([f, *discs], axis=1)
    return alone, both


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", nargs="+", required=True, type=Path, help="bin-size shard folders (manifest.json)")
    ap.add_argument("--concat", action="store_true", help="also the features of every folder side by side")
    ap.add_argument("--mlp", action="store_true", help="also an MLP read-out")
    ap.add_argument("--cohort", type=Path, help="the magnet synth folder: the ridges also per gene group")
    ap.add_argument("--field-sd-um", nargs="*", type=float, default=[],
                    help="also the first folder's bin feature with its field at these sds (um)")
    ap.add_argument("--by-type", action="store_true", help="with --cohort: also the ridge's markers per cell type")
    ap.add_argument("--views", type=int, choices=(1, 8), default=1, help="8: mean feature over the dihedral views")
    ap.add_argument("--encoder-weights", type=Path, help="--views 8: the first folder's encoder weights")
    ap.add_argument("--neighbours-um", nargs="*", type=float, default=[],
                    help="also the first folder's bin feature with its neighbours' mean within each radius (um)")
    args = ap.parse_args()
    if args.by_type and not args.cohort:
        ap.error("--by-type needs --cohort (the gene groups)")
    data = [load(f) for f in args.shards]
    data = [data[0]] + [align(data[0], d) for d in data[1:]]
    splits = {s: d["split"] for s, d in data[0].items()}
    expr = {s: d["expr"] for s, d in data[0].items()}
    typed = Manifest.load(args.shards[0] / "manifest.json")  # the first folder's, for every read-out below
    group = gene_groups(args.cohort, next(iter(splits)), typed.genes) if args.cohort else None
    types = marker_types(typed.genes, group) if args.by_type else None
    for folder, d in zip(args.shards, data):
        print(f"{folder}: {score({s: v['feat'] for s, v in d.items()}, expr, splits, args.mlp, group, types)}",
              flush=True)
    if args.concat and len(data) > 1:
        both = {s: np.concatenate([d[s]["feat"] for d in data], axis=1) for s in splits}
        print(f"concatenated: {score(both, expr, splits, args.mlp)}", flush=True)
    if args.neighbours_um:
        alone, both = with_neighbours(data[0], typed.geometry.mpp, args.neighbours_um)
        print(f"{args.shards[0]}, {NEIGHBOUR_PCA} components: bin alone {score(alone, expr, splits, False)}; "
              f"with the neighbours' mean within {args.neighbours_um} um {score(both, expr, splits, False)}",
              flush=True)
    if args.field_sd_um:
        for whole in (False, True):
            both = with_field(data[0], typed.geometry.mpp, args.field_sd_um, typed.bin_um, whole)
            print(f"{args.shards[0]}, {NEIGHBOUR_PCA} components with the field at {args.field_sd_um} um "
                  f"{'kept whole' if whole else 'less the slide mean'}: {score(both, expr, splits, args.mlp, group)}",
                  flush=True)
    if args.views == 8:
        import torch

        from sharding.config import EncoderConfig
        from sharding.features import FeatureExtractor

        enc = typed.to_dict()["encoder"]
        weights = args.encoder_weights or args.shards[0].parent / "tuned_encoder.safetensors"
        torch.set_num_threads(1)
        extractor = FeatureExtractor(EncoderConfig(name=enc["name"], weights=str(weights), input_px=enc["input_px"],
                                                   bin_features=True), typed.geometry, seed=0, threads=1)
        tta = align(data[0], load(args.shards[0], extractor))
        print(f"{args.shards[0]}, mean of 8 views: "
              f"{score({s: v['feat'] for s, v in tta.items()}, expr, splits, args.mlp)}", flush=True)


if __name__ == "__main__":
    main()

"""Diagnostic: a copy of a synthetic cohort's shards whose context features are the TRUE cell-type mix.

Each spot tile and global tile node (centre tile and neighbours) gets, in place of its frozen-encoder
features, the share of each cell type among the cells inside its square (from the slide's
``ground_truth/cells.parquet``) and the cell density. A MagNet trained on these shards shows what the
architecture does with ideal context features: if it gains on the context genes where the frozen-encoder
MagNet does not, the bottleneck is the encoder, not the architecture. ``score`` prints the per-gene PCC
per gene group of trained models on one split of shards (whole slides, the training evaluation's
metrics): ``magnet evaluate`` cannot score these models, as it computes context features from the image.

    python bench/context_truth_features.py rewrite --shards SHARDS/16um --cohort SLIDES --out TRUTH/16um
    magnet train --config configs/train/demo.yaml data.shards=TRUTH ...
    python bench/context_truth_features.py score --shards TRUTH --bin-um 16 --cohort SLIDES --split val \
        magnet_truth=RUNS/NAME/model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnet.geometry import Geometry  # noqa: E402
from magnet.synth.tissue import TYPES  # noqa: E402
from magnet.format.codec import decode_sample, encode_sample  # noqa: E402
from magnet.format.sample import Sample  # noqa: E402
from magnet.format.manifest import Manifest, write_manifest  # noqa: E402
from magnet.format.reader import ShardReader  # noqa: E402
from magnet.format.tar import sha256_file  # noqa: E402

RES_UM = 1.0  # cell-count grid


class CellCounts:
    """Cells of each type counted in any axis-aligned square (um), from a cumulative grid."""

    def __init__(self, cells_path: Path):
        t = pq.read_table(cells_path).to_pandas()
        types = t.cell_type.map({n: i for i, n in enumerate(TYPES)}).to_numpy()
        n = int(np.ceil(max(t.x_um.max(), t.y_um.max()) / RES_UM)) + 2
        grid = np.zeros((len(TYPES), n + 1, n + 1), np.int32)
        np.add.at(grid, (types, (t.y_um.to_numpy() / RES_UM).astype(int) + 1, (t.x_um.to_numpy() / RES_UM).astype(int) + 1), 1)
        self.cum, self.n = grid.cumsum(1).cumsum(2), n

    def __call__(self, x0: float, y0: float, side: float) -> np.ndarray:
        """(len(TYPES) + 1,) type shares and cells per 100 um^2 in the square."""
        i0, j0 = (np.clip(int(round(v / RES_UM)), 0, self.n) for v in (y0, x0))
        i1, j1 = (np.clip(int(round((v + side) / RES_UM)), 0, self.n) for v in (y0, x0))
        c = self.cum
        counts = (c[:, i1, j1] - c[:, i0, j1] - c[:, i1, j0] + c[:, i0, j0]).astype(np.float64)
        total = counts.sum()
        return np.append(counts / max(total, 1.0), total / side**2 * 100.0)


def rewrite(sample: Sample, geom: Geometry, counts: CellCounts) -> Sample:
    meta, mpp, g = sample.meta, geom.mpp, geom.global_px
    x0, y0 = meta.gx * g * mpp, meta.gy * g * mpp  # the centre tile's top-left in um
    spot_tl = (geom.spot_centres() - geom.margin - geom.spot_px / 2) * mpp  # spot squares, from the tile's top-left
    offsets, mask = sample["nbr_offset"], sample["nbr_mask"]
    dim = len(TYPES) + 1
    spot = np.zeros((len(offsets), geom.n_spots, dim), np.float16)
    glob = np.zeros((len(offsets), dim), np.float16)
    for r, ((dx, dy), ok) in enumerate(zip(offsets, mask)):
        if not ok:
            continue
        tx, ty = x0 + dx, y0 + dy
        glob[r] = counts(tx, ty, g * mpp)
        for j, (sx, sy) in enumerate(spot_tl):
            spot[r, j] = counts(tx + sx, ty + sy, geom.spot_px * mpp)
    return sample.replace(spot_feat=spot, global_feat=glob)


def score(shards: str, bin_um: int, cohort: Path, split: str, models: list[str], by_type: bool = False) -> None:
    import torch

    from bench.ceiling_probe import gene_groups, marker_types, type_line
    from magnet.data.pipeline import EvalStream, ShardSet
    from magnet.dist import WorldInfo
    from magnet.metrics import ExpressionMetrics
    from magnet.registry.pyfunc import MagnetPyfunc

    shard_set = ShardSet(shards, bin_um, None, None)
    slides = sorted(s for s, v in shard_set.manifest.splits.items() if v == split)
    group = gene_groups(cohort, slides[0], shard_set.genes)
    names = sorted(set(group))
    print("model".ljust(24), "all".rjust(6), *(f"{k}({(group == k).sum()})".rjust(18) for k in names))
    for spec in models:
        label, folder = spec.split("=", 1)
        model = MagnetPyfunc()
        model.load(*(str(Path(folder) / n) for n in ("model.safetensors", "model_meta.json", "config.yaml")))
        cfg = model.config
        cfg.data.workers = 0
        knn = {"k_bin": cfg.model.k_bin, "k_spot": cfg.model.k_spot, "k_global": cfg.model.k_global}
        acc = ExpressionMetrics(len(shard_set.genes), slides)
        reads = ShardSet(shards, bin_um, None, None, cfg.model.bin_input, cfg.model.field)  # what the model reads
        for batch in EvalStream(reads, cfg.data, WorldInfo(0, 1, 0), split, knn):
            acc.update(torch.from_numpy(model.predict_batch(batch)["bin"]), batch.bin_expr, batch.bin_slide, batch.slides)
        pcc = acc.pcc_per_gene().mean(0)  # mean over the split's slides
        print(label.ljust(24), f"{pcc.mean():6.3f}", *(f"{pcc[group == k].mean():18.3f}" for k in names))
        if by_type:
            print(type_line(pcc, marker_types(shard_set.genes, group)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rw = sub.add_parser("rewrite", help="copy one bin size's shards with the true cell-type mix as context features")
    rw.add_argument("--shards", required=True, type=Path, help="one bin size's shard folder (manifest.json)")
    rw.add_argument("--cohort", required=True, type=Path, help="the magnet synth folder the shards came from")
    rw.add_argument("--out", required=True, type=Path)
    sc = sub.add_parser("score", help="per-gene PCC per gene group of trained models on a split of shards")
    sc.add_argument("--shards", required=True, help="shard root (holding {bin}um/)")
    sc.add_argument("--bin-um", required=True, type=int)
    sc.add_argument("--cohort", required=True, type=Path, help="the magnet synth folder (gene groups)")
    sc.add_argument("--split", default="val")
    sc.add_argument("--by-type", action="store_true", help="also the markers' PCC per cell type")
    sc.add_argument("models", nargs="+", metavar="LABEL=MODEL_DIR", help="a training run's model/ folder")
    args = ap.parse_args()
    if args.cmd == "score":
        score(args.shards, args.bin_um, args.cohort, args.split, args.models, args.by_type)
        return
    typed = Manifest.load(args.shards / "manifest.json")
    reader, manifest, geom = ShardReader(typed), typed.to_dict(), typed.geometry
    args.out.mkdir(parents=True)
    counts, n = {}, 0
    for shard in manifest["shards"]:
        slide = shard["slide"]
        if slide not in counts:
            counts[slide] = CellCounts(args.cohort / slide / "ground_truth" / "cells.parquet")
        with open(args.out / shard["name"], "wb") as fh:  # webdataset's writer, deterministic as the shards are
            tar = wds.TarWriter(fh, user="", group="", mode=0o644, mtime=0, encoder=False, compress=False)
            for raw in reader.raw(iter([{"url": str(args.shards / shard["name"])}])):
                image = next(k for k in raw if k.startswith("image."))
                tar.write(encode_sample(rewrite(decode_sample(raw), geom, counts[slide]), raw[image], image[6:]))
                n += 1
            tar.close()
        shard["bytes"], shard["sha256"] = (args.out / shard["name"]).stat().st_size, sha256_file(args.out / shard["name"])
    manifest["encoder"] = {"name": "truth-cell-type-mix", "feat_dim": len(TYPES) + 1, "input_px": 0,
                           "weights": "none (ground truth)"}
    write_manifest(args.out / "manifest.json", manifest)
    print(f"rewrote {n} samples in {len(manifest['shards'])} shards; context features: {len(TYPES)} type shares + density")


if __name__ == "__main__":
    main()

"""Diagnostic: a copy of a synthetic cohort's shards whose context features are the TRUE cell-type mix.

Each spot tile and global tile node (centre tile and neighbours) gets, in place of its frozen-encoder
features, the share of each cell type among the cells inside its square (from the slide's
``ground_truth/cells.parquet``) and the cell density. A MagNet trained on these shards shows what the
architecture does with ideal context features: if it gains on the context genes where the frozen-encoder
MagNet does not, the bottleneck is the encoder, not the architecture. Prints the number of samples
rewritten and the feature size.

    python bench/context_truth_features.py --shards SHARDS/16um --cohort SLIDES --out TRUTH_SHARDS/16um
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from magnet.geometry import Geometry  # noqa: E402
from magnet.synth.tissue import TYPES  # noqa: E402
from sharding.writer import decode_npy, encode_npy, sha256_file  # noqa: E402

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


def rewrite(members: dict[str, bytes], geom: Geometry, counts: CellCounts) -> None:
    meta = json.loads(members["meta.json"])
    mpp, g = geom.mpp, geom.global_px
    offsets, mask = decode_npy(members["nbr_offset.npy.zst"]), decode_npy(members["nbr_mask.npy.zst"])
    x0, y0 = meta["gx"] * g * mpp, meta["gy"] * g * mpp  # the centre tile's top-left in um
    spot_tl = (geom.spot_centres() - geom.margin - geom.spot_px / 2) * mpp  # spot squares, from the tile's top-left
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
    members["spot_feat.npy.zst"], members["global_feat.npy.zst"] = encode_npy(spot), encode_npy(glob)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", required=True, type=Path, help="one bin size's shard folder (manifest.json)")
    ap.add_argument("--cohort", required=True, type=Path, help="the magnet synth folder the shards came from")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    manifest = json.loads((args.shards / "manifest.json").read_text())
    geom = Geometry(**{k: manifest["geometry"][k] for k in ("mpp", "global_px", "spot_px", "bin_px")})
    args.out.mkdir(parents=True)
    counts, n = {}, 0
    for shard in manifest["shards"]:
        slide = shard["slide"]
        if slide not in counts:
            counts[slide] = CellCounts(args.cohort / slide / "ground_truth" / "cells.parquet")
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(args.shards / shard["name"]) as tar:
            for info in tar:
                key, ext = info.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
        with tarfile.open(args.out / shard["name"], "w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in samples.items():
                rewrite(members, geom, counts[slide])
                n += 1
                for ext in sorted(members):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(members[ext])
                    tar.addfile(info, io.BytesIO(members[ext]))
        shard["bytes"], shard["sha256"] = (args.out / shard["name"]).stat().st_size, sha256_file(args.out / shard["name"])
    manifest["encoder"] = {"name": "truth-cell-type-mix", "feat_dim": len(TYPES) + 1, "input_px": 0,
                           "weights": "none (ground truth)"}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"rewrote {n} samples in {len(manifest['shards'])} shards; context features: {len(TYPES)} type shares + density")


if __name__ == "__main__":
    main()

"""``magnet shard``: Space Ranger HD outputs to WebDataset shards; ``magnet shard validate DIR`` checks them."""

from __future__ import annotations

import argparse
import json

from magnet.config import load_config
from magnet.errors import UserError
from sharding.config import ShardConfig

USAGE = """examples:
  magnet shard --samplesheet slides.csv --bin-um 8 16 --out shards [--address auto] [--config FILE] [key=value ...]
  magnet shard validate shards/16um"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "shard", help="write WebDataset shards (multi-scale tiles, neighbourhoods) from Space Ranger HD outputs",
        description=__doc__, epilog=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--samplesheet", help="CSV: slide,spaceranger,image[,split][,fold][,patient]")
    p.add_argument("--bin-um", type=int, nargs="+", default=None, metavar="UM", help="bin sizes, e.g. 8 16")
    p.add_argument("--out", help="output folder: OUT/{bin}um/{split}-NNNNNN.tar + manifest.json")
    p.add_argument("--config", help="YAML config (configs/shard/*.yaml)")
    p.add_argument("--address", default=None, help="Ray cluster address (e.g. auto); default: local Ray")
    p.add_argument("args", nargs="*", metavar="key=value | validate DIR",
                   help="config overrides (e.g. shard.image_format=png), or 'validate DIR'")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.args and args.args[0] == "validate":
        if len(args.args) != 2:
            raise UserError("shard validate: expects exactly one folder, e.g. magnet shard validate shards/16um")
        from sharding.validate import validate  # start-up time: torch and webdataset load with the shard reader

        print(json.dumps(validate(args.args[1]), indent=1))
        return 0
    for flag in ("samplesheet", "bin_um", "out"):
        if getattr(args, flag) is None:
            raise UserError(f"shard: --{flag.replace('_', '-')} is required")
    from sharding.run import shard_cohort, summary  # start-up time: torch and webdataset load with the writer

    cfg = load_config(ShardConfig, args.config, args.args)
    manifests = shard_cohort(args.samplesheet, args.bin_um, args.out, cfg, address=args.address)
    for manifest in manifests.values():
        print(json.dumps(summary(manifest)))
    return 0

"""``magnet sweep`` as a script, for ``ray job submit`` (same parser, same code: magnet/commands/sweep.py).

    python launch/sweep.py --config configs/sweep/resolutions.yaml [key=value ...]   # local Ray
    python launch/sweep.py --config FILE --address auto                             # on a Ray cluster
    python launch/sweep.py --config FILE --resume                                   # an interrupted sweep
"""

from __future__ import annotations

import sys

from magnet.cli import main as magnet_main


def main(argv: list[str] | None = None) -> int:
    return magnet_main(["sweep", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""``magnet experiment`` as a script, for ``ray job submit`` (same parser, same code:
magnet/commands/experiment.py).

    python launch/experiment.py --config configs/experiment/context.yaml [key=value ...]
    python launch/experiment.py --config FILE --resume      # an interrupted experiment (training or evaluation)
"""

from __future__ import annotations

import sys

from magnet.cli import main as magnet_main


def main(argv: list[str] | None = None) -> int:
    return magnet_main(["experiment", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

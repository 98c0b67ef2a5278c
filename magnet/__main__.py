import sys

from magnet.cli import main

sys.exit(main())

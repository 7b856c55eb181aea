"""``python -m effnn.bench``: same as ``effnn bench``."""

import sys

from effnn.bench.command import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m effnn.bench"))

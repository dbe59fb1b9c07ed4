"""`python -m lightserve.benchmark`."""

import sys

from lightserve.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())

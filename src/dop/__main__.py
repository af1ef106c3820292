"""`python -m dop ...` and `torchrun ... -m dop ...`: the `dop` command."""

import sys

from dop.cli import main

if __name__ == "__main__":
    sys.exit(main())

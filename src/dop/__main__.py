"""`python -m dop` is the `dop` command."""

import sys

from dop.cli import main

sys.exit(main())

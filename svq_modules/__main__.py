"""``python -m svq_modules``: the command line (see :mod:`svq_modules.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

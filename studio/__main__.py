"""python -m studio: the same as the pccnet-studio command."""

from __future__ import annotations

import sys

from studio.cli import main

if __name__ == "__main__":
    sys.exit(main())

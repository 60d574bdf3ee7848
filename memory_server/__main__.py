"""`python -m memory_server` / `pccnet-memory-server`: start the memory server (flags in cli.py).

Sets OMP_WAIT_POLICY=PASSIVE (unless already set) before faiss loads libgomp: idle OpenMP workers then
sleep instead of spinning, and on a few shared cores a spinning worker steals the core its sibling
needs (measured here: searches 3-5x slower under contention with the default policy).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .cli import main  # noqa: E402 - the environment must be set before anything loads OpenMP

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

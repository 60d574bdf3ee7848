"""Test-wide set-up: one torch thread per process, import paths, the shared-data locator."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# One intra-op thread in this process and in every process a test starts (they inherit the variable;
# it must be set before torch is imported). The suite runs many processes on a 2-core machine that is
# often busy with other work, where torch's default of a thread per core makes every step wait on
# spinning threads: measured under load, an in-process training test took 35 s with 2 threads, 3 s with 1.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# No per-example time limit for property tests: on a loaded 2-core machine one example can take longer
# than hypothesis's default 200 ms, which fails a correct test (seen while training ran beside the suite).
settings.register_profile("pccnet", deadline=None)
settings.load_profile("pccnet")

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(REPO), str(TESTS)):
    if p not in sys.path:
        sys.path.insert(0, p)


def shared_data_dir() -> Path | None:
    """../shared/data beside the checkout (or $PCCNET_SHARED_DATA); None when absent, e.g. on a fresh clone."""
    env = os.environ.get("PCCNET_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is not present (fresh clone without the shared data sets)")
    return path

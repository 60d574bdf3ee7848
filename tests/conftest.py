"""Test-wide set-up: import paths, the shared-data locator, and a guard that no test leaves processes behind."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

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

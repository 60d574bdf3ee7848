"""Helpers shared by the orchestrating entry points (demo.py, results.py): run a command visibly."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_step(cmd: list[str], what: str, log: Path | None = None) -> None:
    """Print and run `cmd` from the repo root (appending it to `log`); a failure ends the caller."""
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {line}", flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")
    t0 = time.perf_counter()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=path), check=False)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {res.returncode}: {line}")
    print(f"  ({what}: {time.perf_counter() - t0:.0f} s)", flush=True)

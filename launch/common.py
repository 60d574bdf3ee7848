"""What the entry points share: a user error as one line and an exit code, and running a step visibly.

Each launch/ script is argument parsing plus one call into the packages; `report_errors` makes a bad
path, value or address a one-line message instead of a traceback. `run_step` runs another entry point
as a subprocess (the orchestrating scripts: demo, results, fewshot_example).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path


def report_errors(call: Callable[[], object], errors: tuple[type[BaseException], ...], code: int = 2,
                  prefix: str = "error") -> int:
    """Run `call` -> its int result, else 0; one of `errors` is printed as '<prefix>: message' on stderr
    and gives `code`."""
    try:
        result = call()
    except errors as e:
        print(f"{prefix}: {e}", file=sys.stderr)
        return code
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def user_errors() -> tuple[type[BaseException], ...]:
    """What a user of the checkpoint tools can get wrong (imported only when a tool runs)."""
    from trainer.inference import USER_ERRORS

    return USER_ERRORS


def module_command(script: str, *args: str) -> list[str]:
    """The command that runs launch/<script>.py with this interpreter, from any folder."""
    return [sys.executable, "-m", f"launch.{script}", *map(str, args)]


def run_step(cmd: list[str], what: str, log: Path | None = None, cwd: Path | None = None) -> None:
    """Print and run `cmd` (appending it to `log`); a failure ends the caller."""
    line = " ".join(shlex.quote(c) for c in cmd)
    print(f"\n$ {line}", flush=True)
    if log is not None:
        with open(log, "a") as f:
            f.write(line + "\n")
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{what} failed with exit code {res.returncode}: {line}")
    print(f"  ({what}: {time.perf_counter() - t0:.0f} s)", flush=True)

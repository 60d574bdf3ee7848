"""StudioProcess: `python -m studio` on a free loopback port, ready once it prints READY (never a sleep).

Used by the tests and launch/studio_screenshot.py. stderr goes to a file, so a chatty process can
never block on a full pipe; stop() sends SIGTERM and waits, SIGKILL to the group only past a deadline.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class StudioProcess:
    """A running studio: `.url`, `.proc`, `.stop()`, `.stderr()`."""

    def __init__(self, *args: str, log: Path, timeout_s: float = 180.0, env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "studio", "--host", "127.0.0.1", "--port", "0", *args]
        self.log = Path(log)
        environ = dict(os.environ if env is None else env)
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environ.get("PYTHONPATH", "")) if p)
        environ["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.url = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        line = b""
        try:
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    break
                if sel.select(min(left, 1.0)):
                    chunk = os.read(self.proc.stdout.fileno(), 4096)
                    if not chunk:
                        break
                    line += chunk
        finally:
            sel.close()
        first = line.decode(errors="replace").split("\n", 1)[0]
        if not first.startswith("READY "):
            self.stop()
            raise RuntimeError(f"studio did not print READY (got {first!r}); stderr:\n{self.stderr()[-4000:]}")
        return first.split(" ", 1)[1]

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait; SIGKILL to the group only if it does not stop in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""

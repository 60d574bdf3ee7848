"""start_server(): spawn `python -m memory_server`, wait for its READY line, stop it cleanly.

Used by the trainer (rank 0), the colorize tool, tests and benchmarks. stderr goes to a log file so a
chatty server never blocks on a full pipe, and a server that dies before READY raises ServerStartError
with the tail of that log.
"""

from __future__ import annotations

import ctypes
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[1]


class ServerStartError(RuntimeError):
    """The server exited or stayed silent before printing READY."""


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-n_bytes:].decode(errors="replace")


class ServerProcess:
    """A running memory server: `.endpoint`, `.pid`, `.stop()`, `.kill()`, context manager."""

    def __init__(self, proc: subprocess.Popen, endpoint: str, log_path: Path, argv: list[str]) -> None:
        self.proc = proc
        self.endpoint = endpoint
        self.log_path = log_path
        self.argv = argv
        # Drain stdout after READY so nothing the server prints can ever block it.
        self._drain = threading.Thread(target=self._drain_stdout, daemon=True)
        self._drain.start()

    def _drain_stdout(self) -> None:
        try:
            for _ in self.proc.stdout:
                pass
        except (OSError, ValueError):
            pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        """Exit code if the server has exited, else None."""
        return self.proc.poll()

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (finish, snapshot, exit), wait up to timeout_s, then SIGKILL; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def kill(self) -> int:
        """SIGKILL now (a crash); returns the exit code (-9)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._close_pipes()
        return self.proc.returncode

    def _close_pipes(self) -> None:
        self._drain.join(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def log_tail(self, n_bytes: int = 4000) -> str:
        """The end of the server's stderr log."""
        return _tail(self.log_path, n_bytes)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def server_command(data_dir: str | Path | None, bind: str = "tcp://127.0.0.1:0", capacity: int | None = None,
                   key_dim: int | None = None, value_dim: int | None = None, durability: str = "always",
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The argv that start_server runs."""
    argv = [sys.executable, "-m", "memory_server", "--bind", bind, "--durability", durability]
    if data_dir is not None:
        argv += ["--data-dir", str(data_dir)]
    if capacity is not None:
        argv += ["--capacity", str(capacity), "--key-dim", str(key_dim), "--value-dim", str(value_dim)]
    return argv + [str(a) for a in extra_args]


def _terminate_with_parent() -> None:
    # An embedded server must not outlive a kill -9'd trainer: it would hold the data-dir lock that the
    # resumed run's server needs. SIGTERM (not SIGKILL) so it still snapshots and exits cleanly.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_server(data_dir: str | Path | None, bind: str = "tcp://127.0.0.1:0", capacity: int | None = None,
                 key_dim: int | None = None, value_dim: int | None = None, durability: str = "always",
                 extra_args: Sequence[str] = (), timeout_s: float = 60.0,
                 log_path: str | Path | None = None, die_with_parent: bool = True,
                 own_session: bool = False) -> ServerProcess:
    """Spawn a server and return once it prints READY; ServerStartError (with its log tail) otherwise.

    With die_with_parent (Linux), the server gets SIGTERM when the thread that started it dies. With
    own_session, signals sent to the caller's process group (Ctrl-C in a terminal, a supervisor's
    group kill) do not reach it: only the caller's stop() ends it.
    """
    argv = server_command(data_dir, bind, capacity, key_dim, value_dim, durability, extra_args)
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="memory-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path = Path(log_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log_file, stdin=subprocess.DEVNULL,
                                env=env, preexec_fn=_terminate_with_parent if die_with_parent else None,
                                start_new_session=own_session)
    deadline = time.monotonic() + timeout_s
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = b""
    try:
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                raise ServerStartError(f"no READY line from {' '.join(argv)} within {timeout_s:.0f} s; "
                                       f"log {log_path}:\n{_tail(log_path)}")
            if sel.select(min(left, 0.5)):
                chunk = proc.stdout.read1(4096)
                if not chunk:
                    proc.wait()
                    raise ServerStartError(f"memory server exited with code {proc.returncode} before READY; "
                                           f"log {log_path}:\n{_tail(log_path)}")
                line += chunk
    finally:
        sel.close()
    first = line.split(b"\n", 1)[0].decode(errors="replace").strip()
    if not first.startswith("READY "):
        proc.kill()
        proc.wait()
        raise ServerStartError(f"expected 'READY <endpoint>', got {first!r}; log {log_path}:\n{_tail(log_path)}")
    return ServerProcess(proc, first.split(" ", 1)[1], log_path, argv)

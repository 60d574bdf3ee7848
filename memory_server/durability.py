"""Durability: WAL-before-ack, group commit, background snapshots (PROTOCOL.md Guarantees, Recovery).

`always` fdatasyncs the log before replies leave (one fsync per group of queued requests), `batch`
syncs from a helper thread every second, `none` touches no files. Snapshots fork a child that writes
the copy-on-write image of every memory while the parent keeps serving (Redis BGSAVE style); the log is
rotated at the fork (the old segment is sealed with a record naming its successor), and old segments
and snapshots are deleted once the new snapshot is durable. Recovery is in recovery.py.

Every requested snapshot is a `SnapshotTicket`: the server attaches the deferred `snapshot` reply to it
with `add_done_callback`, `InProcessMemory` blocks on `wait`. A snapshot that cannot be taken (fork,
disk) is logged, counted, completes its tickets with the error, removes its tmp directory and is retried
with back-off; it never raises into the request that asked for it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import signal
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .effects import Effect, to_record
from .snapshot import complete_snapshots, remove_path, snapshot_name, write_snapshot
from .store import MemoryStore
from .wal import WalWriter, fsync_dir, segment_name, segment_seq

log = logging.getLogger(__name__)

DURABILITY_MODES = ("always", "batch", "none")
_RETRY_S = (1.0, 60.0)  # back-off after a failed snapshot: 1 s doubling to 60 s


class DataDirLocked(RuntimeError):
    """Another live server holds the data directory."""


class DataDirUnusable(RuntimeError):
    """The data directory is not a usable directory (a regular file, not writable): exit 2."""


class RecoveryError(RuntimeError):
    """The data directory cannot be recovered (corrupt log or snapshot, a record that cannot apply): exit 4."""


@dataclass
class DurabilityConfig:
    """Where and how mutations are made durable."""

    data_dir: Path | None = None
    mode: str = "always"
    snapshot_wal_bytes: int = 512 * 1024 * 1024
    snapshot_interval_s: float = 300.0
    fork_snapshots: bool = hasattr(os, "fork")
    snapshot_pause_s: float = 0.0  # test hook: hold a snapshot open before its rename
    lock_timeout_s: float = 10.0
    batch_interval_s: float = 1.0
    fault_fork_failures: int = 0  # test hook: this many forks fail with EAGAIN
    fault_snapshot_failures: int = 0  # test hook: this many snapshot writes fail with ENOSPC midway
    upgrade: bool = True  # upgrade a format-1 data dir on start (False: refuse it, exit 4)
    fault_upgrade_kill_at: int = 0  # test hook: SIGKILL at this step of an upgrade (legacy.py)


@dataclass
class RecoveryReport:
    """What `Durability.open` found and did."""

    snapshot_seq: int | None = None
    records_replayed: int = 0
    torn_tail: str | None = None
    seconds: float = 0.0
    memories: list[str] = field(default_factory=list)


class SnapshotTicket:
    """The completion of one requested snapshot: `done`, `ok`, `message`, and callbacks run on completion."""

    def __init__(self) -> None:
        self.done = False
        self.ok = False
        self.message = ""
        self._callbacks: list[Callable[[SnapshotTicket], None]] = []

    def add_done_callback(self, fn: Callable[[SnapshotTicket], None]) -> None:
        """Run `fn(ticket)` once the snapshot is durable or has failed (at once if it already has)."""
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def complete(self, ok: bool, message: str = "") -> None:
        """Mark done and run the callbacks (Durability calls this)."""
        self.done, self.ok, self.message = True, ok, message
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)


@dataclass
class _Child:
    pid: int
    seq: int
    t0: float
    tickets: list[SnapshotTicket]


def _die_with_parent() -> None:
    # A snapshot child must not outlive a kill -9'd server: it holds the data-dir lock and the port.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Durability:
    """The log writer, snapshot scheduler and (via recovery.py) recovery of one data directory."""

    def __init__(self, cfg: DurabilityConfig, metrics: Any = None) -> None:
        if cfg.mode not in DURABILITY_MODES:
            raise ValueError(f"durability {cfg.mode!r} is not one of {DURABILITY_MODES}")
        if cfg.mode != "none" and cfg.data_dir is None:
            raise ValueError(f"--durability {cfg.mode} needs --data-dir")
        self.cfg = cfg
        self.metrics = metrics
        self.enabled = cfg.mode != "none"
        self.seq = 0  # current WAL segment
        self.lsn = 0  # sequence number of the next logged effect
        self.snap_seq: int | None = None
        self.writer: WalWriter | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._lock_fd = -1
        self.child: _Child | None = None
        self.waiting: list[SnapshotTicket] = []  # requested, not yet started
        self.want_snapshot = False  # a background snapshot is wanted (after a drop), under back-off
        self.records_since_rotation = 0
        self.bytes_since_snapshot = 0
        self.snapshot_current = False
        self.last_snapshot_time = time.monotonic()
        self.next_attempt = 0.0
        self.failures = 0  # consecutive failed snapshots
        self.failures_total = 0

    # ---- start-up -------------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """flock the data dir's LOCK file, waiting up to lock_timeout_s; DataDirLocked otherwise."""
        path = self.cfg.data_dir / "LOCK"
        try:
            self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirUnusable(f"cannot open {path}: {exc}") from exc
        deadline = time.monotonic() + self.cfg.lock_timeout_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() > deadline:
                    holder = os.pread(self._lock_fd, 64, 0).decode(errors="replace").strip()
                    raise DataDirLocked(
                        f"data dir {self.cfg.data_dir} is locked by another server (pid {holder or '?'}) "
                        f"after {self.cfg.lock_timeout_s:.0f} s"
                    ) from exc
                time.sleep(0.05)
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)

    def segments(self) -> list[tuple[int, Path]]:
        """WAL segment files of the data dir, by sequence number."""
        found = [(s, p) for p in self.cfg.data_dir.iterdir() if (s := segment_seq(p)) is not None]
        return sorted(found)

    def open(self, store: MemoryStore) -> RecoveryReport:
        """Lock the data dir, load the newest snapshot, replay the log, open the log for appends.

        DataDirUnusable (exit 2), DataDirLocked (exit 5) or RecoveryError (exit 4) when it cannot.
        """
        if not self.enabled:
            return RecoveryReport()
        from .recovery import recover  # noqa: PLC0415 - recovery imports this module

        report = recover(self, store)
        if self.cfg.mode == "batch":
            self._sync_thread = threading.Thread(target=self._sync_loop, name="wal-group-commit", daemon=True)
            self._sync_thread.start()
        self._set_wal_gauge()
        return report

    # ---- logging --------------------------------------------------------------------------------

    def log(self, effect: Effect) -> int:
        """Append `effect` to the log (durable after `commit` in `always` mode); returns a mark for unlog."""
        if not self.enabled:
            return -1
        header, arrays = to_record(effect)
        header["n"] = self.lsn
        with self._lock:
            mark = self.writer.size
            n = self.writer.append(header, arrays)
            self._dirty = True
        self.lsn += 1
        self.records_since_rotation += 1
        self.bytes_since_snapshot += n
        self.snapshot_current = False
        if self.metrics is not None:
            self.metrics.wal_bytes.inc(n)
        return mark

    def unlog(self, mark: int) -> None:
        """Remove the record just logged (its effect could not be applied): durably, before anything else."""
        if not self.enabled or mark < 0:
            return
        with self._lock:
            n = self.writer.size - mark
            self.writer.truncate(mark)
        self.lsn -= 1
        self.records_since_rotation -= 1
        self.bytes_since_snapshot -= n
        if self.metrics is not None:
            self.metrics.wal_bytes.dec(n)

    @property
    def dirty(self) -> bool:
        """True when `always` mode has appended records not yet fsync'ed."""
        return self._dirty and self.cfg.mode == "always"

    def commit(self) -> None:
        """fdatasync pending records (always mode); replies may leave afterwards. OSError if the disk fails."""
        if self._dirty and self.cfg.mode == "always":
            self._sync_now()

    def _sync_now(self) -> None:
        with self._lock:
            if not self._dirty or self.writer is None:
                return
            self._dirty = False  # cleared first: a record appended during the sync sets it again
            t0 = time.perf_counter()
            self.writer.sync()
            if self.metrics is not None:
                self.metrics.wal_fsync.observe(time.perf_counter() - t0)

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.cfg.batch_interval_s):
            try:
                self._sync_now()
            except OSError:
                log.exception("group commit fdatasync failed")

    # ---- snapshots ------------------------------------------------------------------------------

    def _wal_bytes(self) -> int:
        return sum(p.stat().st_size for _, p in self.segments())

    def _set_wal_gauge(self) -> None:
        if self.metrics is not None and self.enabled:
            self.metrics.wal_bytes.set(self._wal_bytes())

    def _rotate(self) -> int:
        """Start segment seq+1 and seal the current one with a record naming it; returns the new seq."""
        with self._lock:
            new_seq = self.seq + 1
            path = self.cfg.data_dir / segment_name(new_seq)
            remove_path(path)  # a leftover of a rotation that failed half-way
            new = WalWriter(path, new_seq, create=True)
            try:
                fsync_dir(self.cfg.data_dir)
                self.writer.append({"t": "seal", "next": new_seq}, [])
                self.writer.sync()
            except BaseException:
                new.close()
                remove_path(path)
                raise
            self.writer.close()
            self.writer, self.seq, self._dirty = new, new_seq, False
        self.records_since_rotation = 0
        self.bytes_since_snapshot = 0
        return new_seq

    def schedule_snapshot(self) -> None:
        """Ask for a background snapshot (taken by `poll`, under the failure back-off); never raises."""
        if self.enabled:
            self.want_snapshot = True

    def request_snapshot(self, store: MemoryStore) -> SnapshotTicket:
        """A ticket completed once a snapshot covering everything applied so far is durable (or failed).

        Starts one now unless one is running (the ticket then waits for the next). Never raises.
        """
        ticket = SnapshotTicket()
        if not self.enabled:
            ticket.complete(True, "durability none: nothing written")
            return ticket
        if self.child is None and self.snapshot_current:
            ticket.complete(True)
            return ticket
        self.waiting.append(ticket)
        if self.child is None:
            self._start(store)
        return ticket

    def _fork(self) -> int:
        if self.cfg.fault_fork_failures > 0:
            self.cfg.fault_fork_failures -= 1
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable (injected by --fault-fork-fail)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12 warns on fork with threads
            return os.fork()

    def _write_args(self) -> dict[str, Any]:
        fail_after = None
        if self.cfg.fault_snapshot_failures > 0:
            self.cfg.fault_snapshot_failures -= 1
            fail_after = 1  # fail after the first bytes, so a partial tmp directory exists to clean up
        return {"pause_s": self.cfg.snapshot_pause_s, "fail_after_bytes": fail_after}

    def _start(self, store: MemoryStore) -> None:
        tickets, self.waiting = self.waiting, []
        self.want_snapshot = False
        t0 = time.monotonic()
        self.last_snapshot_time = t0
        try:
            seq = self._rotate()
        except OSError as exc:
            self._failed(None, tickets, t0, f"cannot rotate the log: {exc}")
            return
        mems, next_lsn, write_args = list(store.memories.values()), self.lsn, self._write_args()
        if not self.cfg.fork_snapshots:
            try:
                write_snapshot(self.cfg.data_dir, seq, mems, next_lsn, **write_args)
            except (OSError, MemoryError) as exc:
                self._failed(seq, tickets, t0, f"snapshot {seq} failed: {exc}")
                return
            self._succeeded(seq, tickets, t0)
            return
        parent = os.getpid()
        try:
            pid = self._fork()
        except OSError as exc:
            self._failed(seq, tickets, t0, f"cannot fork the snapshot child: {exc}")
            return
        if pid == 0:  # child: write the copy-on-write image and leave without running any cleanup
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _die_with_parent()
                if os.getppid() == parent:
                    write_snapshot(self.cfg.data_dir, seq, mems, next_lsn, **write_args)
                    code = 0
            except BaseException:  # noqa: BLE001 - the child reports any failure through its exit code
                try:
                    os.write(2, f"snapshot {seq} failed:\n{traceback.format_exc()}".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        self.child = _Child(pid, seq, t0, tickets)
        log.info("snapshot %d started in child pid %d", seq, pid)

    def _succeeded(self, seq: int, tickets: list[SnapshotTicket], t0: float) -> None:
        self.snap_seq = seq
        self.snapshot_current = self.records_since_rotation == 0
        self.failures = 0
        for s, p in complete_snapshots(self.cfg.data_dir):
            if s < seq:
                remove_path(p)
        for s, p in self.segments():
            if s < seq:
                p.unlink()
        seconds = time.monotonic() - t0
        log.info("snapshot %d durable in %.3f s", seq, seconds)
        if self.metrics is not None:
            self.metrics.snapshot_duration.observe(seconds)
            self.metrics.last_snapshot.set(time.time())
        self._set_wal_gauge()
        for t in tickets:
            t.complete(True)
        if self.waiting and self.snapshot_current:
            done, self.waiting = self.waiting, []
            for t in done:
                t.complete(True)

    def _failed(self, seq: int | None, tickets: list[SnapshotTicket], t0: float, message: str) -> None:
        if seq is not None:
            remove_path(self.cfg.data_dir / (snapshot_name(seq) + ".tmp"))
        self.failures += 1
        self.failures_total += 1
        delay = min(_RETRY_S[1], _RETRY_S[0] * 2 ** (self.failures - 1))
        self.next_attempt = time.monotonic() + delay
        self.want_snapshot = True
        log.error("%s; retrying in %.0f s (the log still holds every acknowledged request)", message, delay)
        if self.metrics is not None:
            self.metrics.snapshot_failures.inc()
        self._set_wal_gauge()
        for t in tickets:
            t.complete(False, message)

    def _reap(self, status: int) -> None:
        child, self.child = self.child, None
        code = os.waitstatus_to_exitcode(status)
        if code == 0:
            self._succeeded(child.seq, child.tickets, child.t0)
        else:
            self._failed(child.seq, child.tickets, child.t0, f"snapshot {child.seq} child exited with code {code}")

    def poll(self, store: MemoryStore, now: float | None = None) -> None:
        """Reap a finished snapshot child (completing its tickets) and start due snapshots."""
        if not self.enabled:
            return
        if self.child is not None:
            got, status = os.waitpid(self.child.pid, os.WNOHANG)
            if got == self.child.pid:
                self._reap(status)
        now = time.monotonic() if now is None else now
        if self.child is not None:
            return
        if self.waiting:
            self._start(store)
        elif now >= self.next_attempt and not self.snapshot_current:
            due_bytes = self.bytes_since_snapshot >= self.cfg.snapshot_wal_bytes
            due_time = now - self.last_snapshot_time >= self.cfg.snapshot_interval_s
            if due_bytes or due_time or self.want_snapshot:
                self._start(store)

    def wait(self, ticket: SnapshotTicket, store: MemoryStore) -> None:
        """Block until `ticket` completes (waitpid on the child: no polling)."""
        while not ticket.done:
            if self.child is not None:
                _, status = os.waitpid(self.child.pid, 0)
                self._reap(status)
            else:
                self._start(store)

    def close(self, store: MemoryStore, final_snapshot: bool = True) -> bool:
        """Finish a running snapshot, write a final one if state changed, close the log and the lock.

        Returns False when the final snapshot was needed and failed (the log still holds everything).
        """
        ok = True
        if not self.enabled:
            return ok
        if self.child is not None:
            _, status = os.waitpid(self.child.pid, 0)
            self._reap(status)
        if final_snapshot and (not self.snapshot_current or self.waiting):
            self.cfg.fork_snapshots = False  # in this process: the loop is over
            ticket = SnapshotTicket()
            self.waiting.append(ticket)
            self._start(store)
            ok = ticket.ok
        for t in self.waiting:
            t.complete(False, "server stopped")
        self.waiting = []
        self._stop.set()
        if self._sync_thread is not None:
            self._sync_thread.join()
        with self._lock:
            if self.writer is not None:
                self.writer.sync()
                self.writer.close()
                self.writer = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        return ok

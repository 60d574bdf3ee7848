"""Durability: WAL-before-ack, group commit, background snapshots, recovery (PROTOCOL.md Guarantees).

`always` fdatasyncs the log before replies leave (one fsync per group of queued requests), `batch`
syncs from a helper thread every second, `none` touches no files. Snapshots fork a child that writes
the copy-on-write image of every memory while the parent keeps serving (Redis BGSAVE style); the log is
rotated at the fork, and old segments and snapshots are deleted once the new snapshot is durable.
Recovery = newest complete snapshot + replay of the later segments through `MemoryStore.apply`.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .effects import Effect, from_record, to_record
from .snapshot import SnapshotCorrupt, complete_snapshots, load_snapshot, write_snapshot
from .store import MemoryStore
from .wal import TornTail, WalCorrupt, WalWriter, fsync_dir, read_segment, segment_name, segment_seq

log = logging.getLogger(__name__)

DURABILITY_MODES = ("always", "batch", "none")
_RETRY_FAILED_SNAPSHOT_S = 10.0


class DataDirLocked(RuntimeError):
    """Another live server holds the data directory."""


class RecoveryError(RuntimeError):
    """The data directory cannot be recovered (corrupt log or snapshot)."""


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


@dataclass
class RecoveryReport:
    """What `Durability.open` found and did."""

    snapshot_seq: int | None = None
    records_replayed: int = 0
    torn_tail: str | None = None
    seconds: float = 0.0
    memories: list[str] = field(default_factory=list)


def _die_with_parent() -> None:
    # A snapshot child must not outlive a kill -9'd server: it holds the data-dir lock and the port.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Durability:
    """The log writer, snapshot scheduler and recovery of one data directory."""

    def __init__(self, cfg: DurabilityConfig, metrics: Any = None) -> None:
        if cfg.mode not in DURABILITY_MODES:
            raise ValueError(f"durability {cfg.mode!r} is not one of {DURABILITY_MODES}")
        if cfg.mode != "none" and cfg.data_dir is None:
            raise ValueError(f"--durability {cfg.mode} needs --data-dir")
        self.cfg = cfg
        self.metrics = metrics
        self.enabled = cfg.mode != "none"
        self.seq = 0
        self.snap_seq: int | None = None
        self.writer: WalWriter | None = None
        self._dirty = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._lock_fd = -1
        self.child: tuple[int, int, float] | None = None  # pid, seq, start time
        self.inflight: list[Any] = []
        self.pending: list[Any] = []
        self.records_since_rotation = 0
        self.bytes_since_snapshot = 0
        self.snapshot_current = False
        self.last_snapshot_time = time.monotonic()
        self.next_attempt = 0.0

    # ---- start-up -------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        path = self.cfg.data_dir / "LOCK"
        self._lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
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

    def _segments(self) -> list[tuple[int, Path]]:
        found = [(s, p) for p in self.cfg.data_dir.iterdir() if (s := segment_seq(p)) is not None]
        return sorted(found)

    def open(self, store: MemoryStore) -> RecoveryReport:
        """Lock the data dir, load the newest snapshot, replay the log, open the log for appends."""
        report = RecoveryReport()
        if not self.enabled:
            return report
        t0 = time.monotonic()
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self._acquire_lock()
        for p in self.cfg.data_dir.glob("snap-*.tmp"):
            shutil.rmtree(p)  # an interrupted snapshot: the previous one is still complete
        store.attach_searchers = False
        snaps = complete_snapshots(self.cfg.data_dir)
        start = 1
        if snaps:
            self.snap_seq, path = snaps[-1]
            try:
                start, mems = load_snapshot(path)
            except SnapshotCorrupt as exc:
                raise RecoveryError(str(exc)) from exc
            for mem in mems:
                store.add(mem)
            report.snapshot_seq = self.snap_seq
        segs = [(s, p) for s, p in self._segments() if s >= start]
        if not snaps and segs:
            start = segs[0][0]
        for i, (s, p) in enumerate(segs):
            if s != start + i:
                raise RecoveryError(f"WAL segment {segment_name(start + i)} is missing before {p.name}")
            try:
                for header, arrays in read_segment(p, allow_torn_tail=(i == len(segs) - 1)):
                    store.apply(from_record(header, arrays))
                    report.records_replayed += 1
            except TornTail as torn:
                report.torn_tail = f"{p.name}: {torn}"
                log.warning("recovery: %s", report.torn_tail)
            except (WalCorrupt, ValueError, KeyError, RuntimeError) as exc:
                raise RecoveryError(f"cannot replay {p}: {type(exc).__name__}: {exc}") from exc
        self.seq = segs[-1][0] if segs else start
        for _, p in snaps[:-1]:
            shutil.rmtree(p, ignore_errors=True)
        for s, p in self._segments():
            if s < start:
                p.unlink()
        self.writer = WalWriter(self.cfg.data_dir / segment_name(self.seq))
        fsync_dir(self.cfg.data_dir)
        self.records_since_rotation = report.records_replayed
        self.bytes_since_snapshot = self._wal_bytes()
        self.snapshot_current = bool(snaps) and report.records_replayed == 0
        store.attach_all()
        if self.cfg.mode == "batch":
            self._sync_thread = threading.Thread(target=self._sync_loop, name="wal-group-commit", daemon=True)
            self._sync_thread.start()
        report.seconds = time.monotonic() - t0
        report.memories = sorted(store.memories)
        self._set_wal_gauge()
        return report

    # ---- logging --------------------------------------------------------------------------------

    def log(self, effect: Effect) -> None:
        """Append `effect` to the log (durable after `commit` in `always` mode)."""
        if not self.enabled:
            return
        header, arrays = to_record(effect)
        n = self.writer.append(header, arrays)
        self._dirty = True
        self.records_since_rotation += 1
        self.bytes_since_snapshot += n
        self.snapshot_current = False
        if self.metrics is not None:
            self.metrics.wal_bytes.inc(n)

    @property
    def dirty(self) -> bool:
        """True when `always` mode has appended records not yet fsync'ed."""
        return self._dirty and self.cfg.mode == "always"

    def commit(self) -> None:
        """fdatasync pending records (always mode); replies may leave afterwards."""
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
        return sum(p.stat().st_size for _, p in self._segments())

    def _set_wal_gauge(self) -> None:
        if self.metrics is not None and self.enabled:
            self.metrics.wal_bytes.set(self._wal_bytes())

    def _rotate(self) -> int:
        with self._lock:
            self.writer.sync()
            self.writer.close()
            self._dirty = False
            self.seq += 1
            self.writer = WalWriter(self.cfg.data_dir / segment_name(self.seq))
            fsync_dir(self.cfg.data_dir)
        self.records_since_rotation = 0
        self.bytes_since_snapshot = 0
        return self.seq

    def request_snapshot(self, store: MemoryStore, token: Any) -> list[tuple[Any, bool, str]]:
        """Ask for a snapshot covering everything applied so far; `token` comes back from poll()."""
        if not self.enabled:
            return [(token, True, "durability none: nothing written")]
        if self.child is None and self.snapshot_current:
            return [(token, True, "")]
        self.pending.append(token)
        if self.child is None:
            return self._start(store)
        return []

    def _start(self, store: MemoryStore) -> list[tuple[Any, bool, str]]:
        seq = self._rotate()
        self.inflight, self.pending = self.pending, []
        mems = list(store.memories.values())
        t0 = time.monotonic()
        self.last_snapshot_time = t0
        if not self.cfg.fork_snapshots:
            return self._write_sync(seq, mems, t0)
        parent = os.getpid()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # 3.12 warns on fork with threads
            pid = os.fork()
        if pid == 0:  # child: write the copy-on-write image and leave without running any cleanup
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _die_with_parent()
                if os.getppid() == parent:
                    write_snapshot(self.cfg.data_dir, seq, mems, self.cfg.snapshot_pause_s)
                    code = 0
            except BaseException:  # noqa: BLE001 - the child reports any failure through its exit code
                try:
                    os.write(2, f"snapshot {seq} failed:\n{traceback.format_exc()}".encode())
                except OSError:
                    pass
            finally:
                os._exit(code)
        self.child = (pid, seq, t0)
        log.info("snapshot %d started in child pid %d", seq, pid)
        return []

    def _write_sync(self, seq: int, mems: list, t0: float) -> list[tuple[Any, bool, str]]:
        try:
            write_snapshot(self.cfg.data_dir, seq, mems, self.cfg.snapshot_pause_s)
        except OSError as exc:
            log.exception("snapshot %d failed", seq)
            return self._finished(seq, False, t0, f"snapshot failed: {exc}", None)
        return self._finished(seq, True, t0, "", None)

    def _finished(self, seq: int, ok: bool, t0: float, message: str,
                  store: MemoryStore | None) -> list[tuple[Any, bool, str]]:
        self.child = None
        done = [(tok, ok, message) for tok in self.inflight]
        self.inflight = []
        if ok:
            self.snap_seq = seq
            self.snapshot_current = self.records_since_rotation == 0
            for s, p in complete_snapshots(self.cfg.data_dir):
                if s < seq:
                    shutil.rmtree(p, ignore_errors=True)
            for s, p in self._segments():
                if s < seq:
                    p.unlink()
            seconds = time.monotonic() - t0
            log.info("snapshot %d durable in %.3f s", seq, seconds)
            if self.metrics is not None:
                self.metrics.snapshot_duration.observe(seconds)
                self.metrics.last_snapshot.set(time.time())
        else:
            self.next_attempt = time.monotonic() + _RETRY_FAILED_SNAPSHOT_S
        self._set_wal_gauge()
        if self.pending and store is not None:
            if self.snapshot_current:
                done += [(tok, True, "") for tok in self.pending]
                self.pending = []
            else:
                done += self._start(store)
        return done

    def poll(self, store: MemoryStore, now: float | None = None) -> list[tuple[Any, bool, str]]:
        """Reap a finished snapshot child and start periodic snapshots; returns finished tokens."""
        if not self.enabled:
            return []
        done: list[tuple[Any, bool, str]] = []
        if self.child is not None:
            pid, seq, t0 = self.child
            got, status = os.waitpid(pid, os.WNOHANG)
            if got == pid:
                ok = os.waitstatus_to_exitcode(status) == 0
                done += self._finished(seq, ok, t0, "" if ok else f"snapshot child exited with {status}", store)
        now = time.monotonic() if now is None else now
        if self.child is None and now >= self.next_attempt and not self.snapshot_current:
            due_bytes = self.bytes_since_snapshot >= self.cfg.snapshot_wal_bytes
            due_time = now - self.last_snapshot_time >= self.cfg.snapshot_interval_s
            if due_bytes or due_time or self.pending:
                done += self._start(store)
        return done

    def close(self, store: MemoryStore, final_snapshot: bool = True) -> list[tuple[Any, bool, str]]:
        """Wait for a running snapshot, write a final one if state changed, close the log and lock."""
        done: list[tuple[Any, bool, str]] = []
        if not self.enabled:
            return done
        if self.child is not None:
            pid, seq, t0 = self.child
            _, status = os.waitpid(pid, 0)
            ok = os.waitstatus_to_exitcode(status) == 0
            done += self._finished(seq, ok, t0, "" if ok else f"snapshot child exited with {status}", None)
        if final_snapshot and (not self.snapshot_current or self.pending):
            seq = self._rotate()
            self.inflight, self.pending = self.pending, []
            done += self._write_sync(seq, list(store.memories.values()), time.monotonic())
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
        return done

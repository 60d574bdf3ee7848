"""Recovery of a data directory: newest snapshot + replay of the later WAL segments (PROTOCOL.md "Recovery").

A data dir holds `FORMAT`, `LOCK`, `snap-<seq>/` and `wal-<seq>.log` segments. Recovery checks, in
order: the directory is usable (else DataDirUnusable, exit 2), its lock (DataDirLocked, exit 5), its
FORMAT (a format-1 data dir, which has none, is first upgraded by legacy.py), the newest snapshot's
checksums, that the segments run without a gap from the snapshot's (from 1 without one), that closed
segments are sealed and name their successor, that records carry consecutive sequence numbers, and
that every record applies to the store (`MemoryStore.check`). Any failure is RecoveryError (exit 4)
naming the file and byte; only a torn tail of the last segment is cut. So a deleted snapshot, a
deleted segment, a record deleted from the middle or a corrupted length all refuse to start instead
of serving less than was acknowledged.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from . import legacy
from .durability import DataDirUnusable, Durability, RecoveryError, RecoveryReport
from .effects import from_record
from .protocol import MemoryServerError, short_repr
from .snapshot import SnapshotCorrupt, complete_snapshots, load_snapshot, remove_path
from .store import EffectInvalid, MemoryStore
from .wal import (
    SEGMENT_HEADER_BYTES,
    TornTail,
    WalCorrupt,
    WalWriter,
    check_segment_header,
    fsync_dir,
    read_segment,
    reset_segment,
    segment_name,
)

log = logging.getLogger(__name__)

FORMAT_FILE = "FORMAT"
FORMAT_TEXT = "pccnet-memory-server data directory, format 2\n"


def _usable_dir(data_dir: Path) -> None:
    if data_dir.exists() and not data_dir.is_dir():
        raise DataDirUnusable(f"--data-dir {data_dir} exists and is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataDirUnusable(f"cannot create --data-dir {data_dir}: {exc}") from exc
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirUnusable(f"--data-dir {data_dir} is not writable")


def _write_format(data_dir: Path) -> None:
    tmp = data_dir / (FORMAT_FILE + ".tmp")
    with open(tmp, "w") as f:
        f.write(FORMAT_TEXT)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, data_dir / FORMAT_FILE)
    fsync_dir(data_dir)


def _initialise(dur: Durability, segs: list) -> None:
    """A new data dir: segment 1, then FORMAT (so FORMAT present means segment 1 was created)."""
    for _, p in segs:
        p.unlink()  # only an empty segment 1 of an initialisation that died before FORMAT
    d = dur.cfg.data_dir
    dur.writer = WalWriter(d / segment_name(1), 1, create=True)
    fsync_dir(d)
    _write_format(d)
    dur.seq, dur.lsn = 1, 0


def _check_format(dur: Durability, snaps: list, segs: list) -> bool:
    """True for a new data dir; RecoveryError when FORMAT is missing or wrong beside existing data."""
    path = dur.cfg.data_dir / FORMAT_FILE
    if path.exists():
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RecoveryError(f"{path}: unreadable ({exc})") from exc
        if text != FORMAT_TEXT:
            raise RecoveryError(f"{path} says {text[:80]!r}, expected {FORMAT_TEXT!r}: a data dir of another "
                                f"format, or damaged")
        return False
    empty_start = [s for s, p in segs] in ([], [1]) and all(p.stat().st_size <= SEGMENT_HEADER_BYTES for _, p in segs)
    if snaps or not empty_start:
        raise RecoveryError(f"{dur.cfg.data_dir} holds snapshots or WAL records but no {FORMAT_FILE} file: written by "
                            f"a server before format 2, or {FORMAT_FILE} was deleted; refusing to guess")
    return True


def _replay_segment(store: MemoryStore, path: Path, seq: int, last: bool, lsn: int,
                    report: RecoveryReport) -> tuple[int, bool, int]:
    """Replay one segment; returns (next lsn, sealed, records)."""
    try:
        if not check_segment_header(path, seq, last):
            log.warning("recovery: %s was being created when the server stopped; starting it empty", path.name)
            reset_segment(path, seq)
            return lsn, False, 0
    except WalCorrupt as exc:
        raise RecoveryError(str(exc)) from exc
    sealed, records = False, 0
    try:
        for offset, header, arrays in read_segment(path, last):
            where = f"{path} record at byte {offset}"
            if sealed:
                raise RecoveryError(f"{where} follows the segment's seal")
            if header.get("t") == "seal":
                if header.get("next") != seq + 1:
                    raise RecoveryError(f"{where}: seal names segment {short_repr(header.get('next'))}, not {seq + 1}")
                sealed = True
                continue
            if header.get("n") != lsn:
                raise RecoveryError(f"{where} has sequence number {short_repr(header.get('n'))} where {lsn} was expected: "
                                    f"records are missing or repeated")
            try:
                effect = from_record(header, arrays)
                store.check(effect)
            except (ValueError, EffectInvalid, MemoryServerError) as exc:
                raise RecoveryError(f"{where} cannot be applied: {exc}") from exc
            try:
                store.commit(effect, store.prepare(effect))
            except Exception as exc:  # noqa: BLE001 - e.g. MemoryError: refuse clearly, never a crash loop
                raise RecoveryError(f"{where}: applying it failed ({type(exc).__name__}: {exc})") from exc
            lsn += 1
            records += 1
            report.records_replayed += 1
    except TornTail as torn:
        report.torn_tail = f"{path.name}: {torn}"
        log.warning("recovery: %s", report.torn_tail)
    except WalCorrupt as exc:
        raise RecoveryError(str(exc)) from exc
    return lsn, sealed, records


def _load(dur: Durability, store: MemoryStore, snaps: list, report: RecoveryReport) -> tuple[int, int]:
    """Load the newest snapshot; returns (first segment to replay, next lsn)."""
    if not snaps:
        return 1, 0
    seq, path = snaps[-1]
    try:
        wal_seq, lsn = load_snapshot(path, store)
    except SnapshotCorrupt as exc:
        raise RecoveryError(f"snapshot {exc}") from exc
    if wal_seq != seq:
        raise RecoveryError(f"{path}: its manifest is of snapshot {wal_seq}")
    dur.snap_seq = report.snapshot_seq = seq
    return seq, lsn


def _check_limits(store: MemoryStore, data_dir: Path) -> None:
    if len(store.memories) > store.max_memories:
        raise RecoveryError(f"{data_dir} holds {len(store.memories)} memories, over --max-memories "
                            f"{store.max_memories}: raise it to start")
    if store.max_memory_bytes is not None and store.total_nbytes() > store.max_memory_bytes:
        raise RecoveryError(f"{data_dir} holds memories of {store.total_nbytes()} bytes, over --max-memory-bytes "
                            f"{store.max_memory_bytes}: raise it to start")


def recover(dur: Durability, store: MemoryStore) -> RecoveryReport:
    """Bring `store` to the last durable state of `dur`'s data dir and open the log for appends."""
    report = RecoveryReport()
    t0 = time.monotonic()
    d = dur.cfg.data_dir
    _usable_dir(d)
    dur.acquire_lock()
    try:
        if not (d / FORMAT_FILE).exists() and legacy.is_format1(d):
            legacy.upgrade(dur, store, _write_format)  # or RecoveryError (--no-upgrade, damage); then format 2
        legacy.tidy(d)
    except OSError as exc:  # unreadable old files, a full disk: a clear exit 4 (a restart resumes or redoes it)
        raise RecoveryError(f"upgrading {d} from format 1 failed: {exc}") from exc
    for p in d.glob("snap-*.tmp"):
        remove_path(p)  # an interrupted snapshot (file or directory): the previous one is still complete
    snaps, segs = complete_snapshots(d), dur.segments()
    if _check_format(dur, snaps, segs):
        _initialise(dur, segs)
        store.attach_all()
        report.seconds = time.monotonic() - t0
        return report
    store.attach_searchers = False
    start, lsn = _load(dur, store, snaps, report)
    segs = [(s, p) for s, p in segs if s >= start]
    if not segs or segs[0][0] != start:
        raise RecoveryError(f"{d / segment_name(start)} is missing: the log after "
                            f"{'snapshot ' + str(start) if snaps else 'the start'} is gone")
    for i, (s, p) in enumerate(segs):
        if s != start + i:
            raise RecoveryError(f"{d / segment_name(start + i)} is missing before {p.name}")
    sealed, counts = [], []
    for i, (s, p) in enumerate(segs):
        lsn, was_sealed, n = _replay_segment(store, p, s, i == len(segs) - 1, lsn, report)
        sealed.append(was_sealed)
        counts.append(n)
    if sealed[-1]:
        raise RecoveryError(f"{segs[-1][1]} is sealed but {segment_name(segs[-1][0] + 1)}, which it names, is missing")
    if len(segs) > 1 and not sealed[-2] and counts[-1] == 0:
        # The server died between creating the next segment and sealing this one: continue in this one.
        log.warning("recovery: %s was never sealed and %s is empty; removing the latter", segs[-2][1].name,
                    segs[-1][1].name)
        segs[-1][1].unlink()
        fsync_dir(d)
        segs, sealed = segs[:-1], sealed[:-1]
    for (_, p), was_sealed in zip(segs[:-1], sealed[:-1], strict=True):
        if not was_sealed:
            raise RecoveryError(f"{p} is a closed segment without its seal: records at its end are missing")
    _check_limits(store, d)
    dur.seq, dur.lsn = segs[-1][0], lsn
    for _, p in snaps[:-1]:
        remove_path(p)
    for s, p in dur.segments():
        if s < start:
            p.unlink()
    dur.writer = WalWriter(segs[-1][1], dur.seq)
    fsync_dir(d)
    dur.records_since_rotation = report.records_replayed
    dur.bytes_since_snapshot = dur._wal_bytes()
    dur.snapshot_current = bool(snaps) and report.records_replayed == 0
    store.attach_all()
    report.seconds = time.monotonic() - t0
    report.memories = sorted(store.memories)
    return report

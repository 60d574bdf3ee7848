"""Upgrade, on start, of a data dir written by the format-1 server (release ad23129) to format 2.

Format 1 is read here and never written. A data dir of it holds `LOCK`, `snap-<seq>/` (a `manifest.json`
{"format": 1, "wal_seq", "memories": [{name, dir, capacity, key_dim, value_dim, version, hits, misses,
seed, files: {file: bytes}}]} and per memory a `mem-<sha256(name)[:20]>/` directory of .npy arrays, the
window's ids as msgpack and its meta/hit/slots as .npy; no checksums) and `wal-<seq>.log` segments (no
header, no sequence numbers, no seals; record = u32 payload length, u32 crc32(payload), payload = u32
header length, msgpack header, raw arrays). Its recovery was: newest snapshot, then the segments from its
`wal_seq` (from 1 without one) without a gap; only the last segment may end in a torn record.

The upgrade replays exactly that with the format's own rules, except that a length field contradicted by
its record's own header is corruption, not a torn tail, and a torn tail is skipped but never cut from the
old file. Any other inconsistency is a RecoveryError (exit 4) naming the file. Then, crash-safely:

1. the new state (a format-2 snapshot `snap-<S>` and an empty segment `wal-<S>.log`, S above every old
   sequence number, plus `UPGRADE.json`) is written and fsync'ed in `upgrade-format-2.tmp/`, which is
   renamed to `upgrade-format-2/` (the commit point: before it the old files are untouched and a restart
   starts over, after it a restart only finishes the moves below);
2. the old `snap-*` (an interrupted `snap-*.tmp` too) and `wal-*` entries are renamed into
   `legacy-format-1/` (kept, never deleted);
3. the new files are renamed into the data dir, `FORMAT` is written (from here on it is a format-2 dir),
   `UPGRADE.json` joins the old files and the staging dir is removed.

Normal recovery then loads the new snapshot, verifying every checksum. `fault_upgrade_kill_at` (a test
hook) SIGKILLs the process at the n-th step of this list, to prove that every interruption restarts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .durability import Durability, RecoveryError
from .effects import (
    CreateEffect,
    DropEffect,
    Effect,
    decode_record_arrays,
    from_record,
)
from .protocol import DTYPES, check_memory_name, short_repr, valid_request_id
from .snapshot import MANIFEST, remove_path, snapshot_name, snapshot_seq, write_snapshot
from .store import MAX_CAPACITY, EffectInvalid, Memory, MemoryStore, WindowEntry, window_entry_nbytes
from .wal import SEGMENT_HEADER_BYTES, WalWriter, fsync_dir, segment_header, segment_name, segment_seq

log = logging.getLogger(__name__)

LEGACY_DIR = "legacy-format-1"
STAGING = "upgrade-format-2"
RECORD_FILE = "UPGRADE.json"
_PREFIX = struct.Struct("<II")  # payload length, crc32(payload)
_HLEN = struct.Struct("<I")
_ARRAYS = ("keys", "values", "ages", "item_ids", "written", "negent")
_WINDOW_NPY = ("window_meta", "window_hit", "window_slots")
_NEW_MAGIC = segment_header(0)[:6]


class _Torn(Exception):
    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"torn final record at byte {offset} ({reason}); skipped (the old file keeps it)")
        self.offset = offset


@dataclass
class UpgradeReport:
    """What an upgrade read and wrote."""

    snapshot_seq: int | None = None
    segments: list[str] = field(default_factory=list)
    records: int = 0
    torn_tail: str | None = None
    window_ids_dropped: int = 0
    new_seq: int = 0


# ---- recognising format 1 ----------------------------------------------------------------------------

def _kind_of_snapshot(path: Path) -> str:
    """'old', 'new' or 'unknown' for a `snap-<seq>` entry."""
    if not path.is_dir():
        return "unknown"
    if (path / "data.bin").exists():
        return "new"
    try:
        fmt = json.loads((path / MANIFEST).read_bytes()).get("format")
    except (OSError, ValueError, AttributeError):
        return "old" if any(p.name.startswith("mem-") for p in path.iterdir()) else "unknown"
    return {1: "old", 2: "new"}.get(fmt, "unknown") if isinstance(fmt, int) else "unknown"


def _kind_of_segment(path: Path) -> str:
    """'old' when the segment starts with a format-1 record whose checksum matches, 'new', 'empty' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(SEGMENT_HEADER_BYTES)
        if not head:
            return "empty"
        if head.startswith(_NEW_MAGIC):
            return "new"
        if len(head) < _PREFIX.size:
            return "unknown"
        length, crc = _PREFIX.unpack_from(head)
        f.seek(_PREFIX.size)
        payload = f.read(length) if length <= path.stat().st_size - _PREFIX.size else b""
    return "old" if len(payload) == length >= _HLEN.size and zlib.crc32(payload) == crc else "unknown"


def is_format1(data_dir: Path) -> bool:
    """True for a data dir without FORMAT that is positively format 1, or an interrupted upgrade of one.

    Positively: at least one snapshot or segment is of format 1 and none is of format 2 (empty segments
    and unreadable entries count for neither; the upgrade itself then refuses on the latter).
    """
    if (data_dir / STAGING).is_dir():
        return True
    kinds = [_kind_of_snapshot(p) for p in data_dir.iterdir() if snapshot_seq(p) is not None]
    kinds += [_kind_of_segment(p) for p in data_dir.iterdir() if segment_seq(p) is not None and p.is_file()]
    return "old" in kinds and "new" not in kinds


def tidy(data_dir: Path) -> None:
    """In a format-2 dir: finish an upgrade whose FORMAT is written (log it, keep its record with the old
    files, remove the staging dir). Logged before the record moves: a kill in between logs it twice."""
    staging, legacy = data_dir / STAGING, data_dir / LEGACY_DIR
    if not staging.is_dir():
        return
    if (staging / RECORD_FILE).exists() and legacy.is_dir():
        try:
            _log_upgrade(data_dir, json.loads((staging / RECORD_FILE).read_bytes()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("upgrade finished; its record %s is unreadable (%s)", staging / RECORD_FILE, exc)
        (staging / RECORD_FILE).replace(legacy / RECORD_FILE)
        fsync_dir(legacy)
    remove_path(staging)
    fsync_dir(data_dir)


def _log_upgrade(d: Path, record: dict[str, Any]) -> None:
    mems = record["memories"]
    listed = ", ".join(f"{m['name']!r} ({m['capacity']} slots, {m['filled']} filled, version {m['version']})"
                       for m in mems[:10]) + (f" and {len(mems) - 10} more" if len(mems) > 10 else "")
    dropped = record["window_ids_dropped"]
    log.warning("upgraded data dir %s from format 1 to format 2: %d memories [%s] from snapshot %s + %d WAL "
                "records%s; the old files are kept in %s", d, len(mems), listed, record["old_snapshot"],
                record["records"], f" ({dropped} remembered replies to request ids that format 2 refuses were "
                f"not kept)" if dropped else "", d / LEGACY_DIR)


# ---- reading format 1 --------------------------------------------------------------------------------

def _fail(path: Path, what: str) -> RecoveryError:
    return RecoveryError(f"format-1 {path}: {what}")


def _implied_length(data: bytes) -> int | None:
    """Payload length that a record's own header declares; None when the header is not all there or does
    not parse (a torn write may leave zeros or garbage: only a readable header can contradict a length)."""
    if len(data) < _HLEN.size:
        return None
    (hlen,) = _HLEN.unpack_from(data)
    if hlen == 0 or len(data) < _HLEN.size + hlen:
        return None
    try:
        header = msgpack.unpackb(data[_HLEN.size:_HLEN.size + hlen], raw=False, strict_map_key=False)
        total = _HLEN.size + hlen
        for _, dtype_name, shape in header["arrays"]:
            n = DTYPES[dtype_name].itemsize
            for d in shape:
                n *= int(d)
            total += n
        return total
    except (ValueError, KeyError, TypeError, msgpack.UnpackException):
        return None


def _rest_is_zero(f: Any) -> bool:
    while chunk := f.read(1 << 20):
        if chunk.count(0) != len(chunk):
            return False
    return True


def _torn(path: Path, last: bool, pos: int, reason: str, data: bytes = b"", length: int = -1) -> _Torn:
    """_Torn for a torn tail of the last segment; RecoveryError when it is damage instead."""
    if not last:
        raise _fail(path, f"{reason} at byte {pos} of a closed segment (not the last one)")
    implied = _implied_length(data)
    if implied is not None and implied != length:
        raise _fail(path, f"the record at byte {pos} declares {length} bytes but its own header describes "
                          f"{implied}: a damaged length, not a torn tail")
    return _Torn(pos, reason)


def read_segment1(path: Path, last: bool) -> Iterator[tuple[int, dict[str, Any], dict[str, np.ndarray]]]:
    """(offset, header, arrays) per record of a format-1 segment; _Torn ends a torn last segment.

    A torn tail (last segment only): the file ends inside a record, or a record fails its checksum and is
    the end of the file or followed only by zeros, or zeros from a record's start on (the old server's
    rules). A record whose readable header contradicts its length field is damage, not a torn tail; that
    and any other damage is RecoveryError naming the file and byte. The file is never modified.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            prefix = f.read(_PREFIX.size)
            if len(prefix) < _PREFIX.size:
                raise _torn(path, last, pos, f"{len(prefix)}-byte fragment of a record prefix")
            length, crc = _PREFIX.unpack(prefix)
            end = pos + _PREFIX.size + length
            if length < _HLEN.size:
                if prefix.count(0) == len(prefix) and _rest_is_zero(f):
                    raise _torn(path, last, pos, "zero bytes from a record's start to the end of the file")
                raise _fail(path, f"the record at byte {pos} declares {length} bytes (a damaged length)")
            if end > size:
                raise _torn(path, last, pos, f"record of {length} bytes, the file ends {end - size} bytes short",
                            f.read(), length)
            payload = f.read(length)
            if zlib.crc32(payload) != crc:
                if end == size or _rest_is_zero(f):
                    raise _torn(path, last, pos, "checksum mismatch in the final record", payload, length)
                raise _fail(path, f"checksum mismatch in the record at byte {pos}, followed by more records")
            try:
                view = memoryview(payload)
                (hlen,) = _HLEN.unpack_from(view, 0)
                header = msgpack.unpackb(view[_HLEN.size:_HLEN.size + hlen], raw=False, strict_map_key=False)
                if not isinstance(header, dict):
                    raise ValueError(f"record header is a {type(header).__name__}, not a map")
                arrays = decode_record_arrays(header.get("arrays", []), view, _HLEN.size + hlen)
            except (ValueError, KeyError, TypeError, struct.error, msgpack.UnpackException) as exc:
                raise _fail(path, f"the record at byte {pos} passes its checksum but does not parse: {exc}") from None
            yield pos, header, arrays
            pos = end


def memory_dirname(name: str) -> str:
    """Format 1's directory of a memory inside a snapshot."""
    return "mem-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:20]


def _uint(x: Any, what: str, path: Path, lo: int = 0) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < lo:
        raise _fail(path, f"{what} is {short_repr(x)}, not an int >= {lo}")
    return x


def _npy(path: Path, size: int, dtype: Any, shape: tuple[int, ...] | None) -> np.ndarray:
    """A .npy file checked against the manifest's size and the expected dtype/shape before anything is
    allocated (a damaged header must not ask for terabytes)."""
    try:
        if path.stat().st_size != size:
            raise _fail(path, f"has {path.stat().st_size} bytes, the manifest says {size}")
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read_header(f)
            count = int(np.prod(got_shape, dtype=object))
            if got_dtype != np.dtype(dtype) or fortran or (shape is not None and got_shape != shape) \
                    or f.tell() + count * got_dtype.itemsize != size:
                raise _fail(path, f"holds {got_dtype}{list(got_shape)} in {size} bytes, expected "
                                  f"{np.dtype(dtype)}{list(shape) if shape is not None else '[...]'}")
            data = f.read(count * got_dtype.itemsize)
    except RecoveryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure of a damaged header: refuse, naming the file
        raise _fail(path, f"unreadable ({type(exc).__name__}: {exc})") from None
    return np.frombuffer(data, got_dtype).reshape(got_shape).copy()


def _window1(d: Path, files: dict[str, int], version: int) -> list[tuple[Any, WindowEntry]]:
    ids_path = d / "window_ids.msgpack"
    try:
        raw = ids_path.read_bytes()
        if len(raw) != files["window_ids.msgpack"]:
            raise _fail(ids_path, f"has {len(raw)} bytes, the manifest says {files['window_ids.msgpack']}")
        ids = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except (OSError, ValueError, msgpack.UnpackException) as exc:
        raise _fail(ids_path, f"unreadable ({type(exc).__name__}: {exc})") from None
    meta = _npy(d / "window_meta.npy", files["window_meta.npy"], np.int64, None)
    hit = _npy(d / "window_hit.npy", files["window_hit.npy"], bool, None)
    slots = _npy(d / "window_slots.npy", files["window_slots.npy"], np.int32, None)
    if not isinstance(ids, list) or meta.ndim != 2 or meta.shape != (len(ids), 2) or hit.ndim != 1 \
            or slots.shape != hit.shape:
        raise _fail(d, "window ids, meta, hit and slots disagree in length")
    out, pos = [], 0
    for req_id, (ver, rows) in zip(ids, meta.tolist(), strict=True):
        if not isinstance(req_id, (str, int)) or isinstance(req_id, bool):  # format 1 took only these
            raise _fail(ids_path, f"window id {short_repr(req_id)} is not a str or int (damaged)")
        if not (1 <= ver <= version and rows >= -1 and pos + max(rows, 0) <= hit.size):
            raise _fail(d / "window_meta.npy", f"window entry of version {ver} with {rows} rows is impossible")
        if rows < 0:
            out.append((req_id, WindowEntry(ver)))
        else:
            out.append((req_id, WindowEntry(ver, hit[pos:pos + rows].copy(), slots[pos:pos + rows].copy())))
            pos += rows
    if pos != hit.size:
        raise _fail(d, f"the window's rows cover {pos} of {hit.size} entries")
    return out


def _memory1(snap: Path, entry: Any, report: UpgradeReport) -> Memory:
    where = snap / MANIFEST
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
        raise _fail(where, f"memory entry {short_repr(entry)} is malformed")
    name = entry.get("name")
    try:
        check_memory_name(name)
    except Exception:
        raise _fail(where, f"memory name {short_repr(name)} is invalid") from None
    if entry.get("dir") != memory_dirname(name):
        raise _fail(where, f"memory {name!r} is listed in directory {short_repr(entry.get('dir'))}")
    m, dk, dv = (_uint(entry.get(k), f"{name!r} {k}", where, lo=1) for k in ("capacity", "key_dim", "value_dim"))
    version, hits, misses, seed = (_uint(entry.get(k), f"{name!r} {k}", where) for k in ("version", "hits", "misses",
                                                                                          "seed"))
    files = entry["files"]
    want = {f"{n}.npy" for n in (*_ARRAYS, *_WINDOW_NPY)} | {"window_ids.msgpack"}
    if set(files) != want or not all(isinstance(v, int) for v in files.values()):
        raise _fail(where, f"memory {name!r} lists files {sorted(files)}, expected {sorted(want)}")
    d = snap / entry["dir"]
    spec = {"keys": (np.float32, (m, dk)), "values": (np.float32, (m, dv)), "ages": (np.float32, (m,)),
            "item_ids": (np.int64, (m,)), "written": (bool, (m,)), "negent": (np.float64, (m,))}
    a = {n: _npy(d / f"{n}.npy", files[f"{n}.npy"], *spec[n]) for n in _ARRAYS}
    # No checksums in format 1: at least refuse what the old server could never have held.
    for n in ("keys", "values", "ages", "negent"):
        if not np.isfinite(a[n]).all():
            raise _fail(d / f"{n}.npy", "holds NaN or Inf (damaged)")
    if (a["values"] < 0).any() or (a["ages"] < 0).any():
        raise _fail(d, "values or ages hold a negative entry (damaged)")
    mem = Memory(name, a["keys"], a["values"], a["ages"], a["item_ids"], a["written"], version=version,
                 hits=hits, misses=misses, seed=seed, negent=a["negent"])
    for req_id, window_entry in _window1(d, files, version):
        if valid_request_id(req_id):
            mem._remember(req_id, window_entry)
        else:
            report.window_ids_dropped += 1
    return mem


def _load_snapshot1(path: Path, seq: int, store: MemoryStore, report: UpgradeReport) -> None:
    if not path.is_dir():
        raise _fail(path, "is not a directory")
    try:
        manifest = json.loads((path / MANIFEST).read_bytes())
    except (OSError, ValueError) as exc:
        raise _fail(path / MANIFEST, f"unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != 1 or not isinstance(manifest.get("memories"), list):
        raise _fail(path / MANIFEST, "is not a format-1 snapshot manifest")
    if manifest.get("wal_seq") != seq:
        raise _fail(path / MANIFEST, f"names WAL segment {short_repr(manifest.get('wal_seq'))}, not {seq}")
    for entry in manifest["memories"]:
        mem = _memory1(path, entry, report)
        if mem.name in store.memories:
            raise _fail(path / MANIFEST, f"memory {mem.name!r} is listed twice")
        store.add(mem)


def _int64(a: Any) -> Any:
    """Integer arrays as int64 (the old apply took any integer dtype); others unchanged."""
    if isinstance(a, np.ndarray) and a.dtype.kind in "iu" and a.dtype != np.int64:
        if a.size and a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
            return a  # left as is: the check refuses it
        return a.astype(np.int64)
    return a


def _apply(store: MemoryStore, effect: Effect, where: str, report: UpgradeReport) -> None:
    """Apply one format-1 effect as the old server did; RecoveryError when it cannot apply."""
    try:
        if isinstance(effect, CreateEffect):
            # Format 1 took any seed >= 0 (format 2 takes < 2**63): check the rest as the store does.
            check_memory_name(effect.name)
            if effect.name in store.memories:
                raise EffectInvalid(f"create of existing memory {effect.name!r}")
            if not all(1 <= x <= MAX_CAPACITY for x in (effect.capacity, effect.key_dim, effect.value_dim)) \
                    or effect.seed < 0:
                raise EffectInvalid(f"create of {effect} is out of range")
            store.commit(effect, store.prepare(effect))
            return
        if isinstance(effect, DropEffect):
            store.check(effect)
            store.commit(effect, None)
            return
        names = [n for n in effect.__dataclass_fields__ if isinstance(getattr(effect, n), np.ndarray)]
        effect = replace(effect, **{n: _int64(getattr(effect, n)) for n in names})
        # An id format 2 refuses (over 256 bytes, past int64): a retry with it is refused anyway, so the
        # effect is applied and its reply not remembered.
        dropped_id = not valid_request_id(effect.req_id)
        store.check(replace(effect, req_id=0) if dropped_id else effect)
        store.commit(effect, store.prepare(effect))
    except RecoveryError:
        raise
    except Exception as exc:  # noqa: BLE001 - EffectInvalid, BadValue, MemoryError: refuse, never crash
        raise RecoveryError(f"format-1 {where} cannot be applied: {type(exc).__name__}: {exc}") from None
    if dropped_id:
        mem = store.memories[effect.name]
        entry = mem.window.pop(effect.req_id)
        mem.window_bytes -= window_entry_nbytes(effect.req_id, entry.rows)
        report.window_ids_dropped += 1


def read_format1(data_dir: Path, store: MemoryStore) -> UpgradeReport:
    """Load the newest format-1 snapshot and replay the format-1 log after it into `store`."""
    report = UpgradeReport()
    snaps = sorted((s, p) for p in data_dir.iterdir() if (s := snapshot_seq(p)) is not None)
    segs = sorted((s, p) for p in data_dir.iterdir() if (s := segment_seq(p)) is not None)
    start = 1
    if snaps:
        start, path = snaps[-1]
        _load_snapshot1(path, start, store, report)
        report.snapshot_seq = start
    segs = [(s, p) for s, p in segs if s >= start]
    if not segs or segs[0][0] != start:
        raise _fail(data_dir / segment_name(start), "is missing: the log after "
                    f"{'snapshot ' + str(start) if snaps else 'the start'} is gone")
    for i, (s, p) in enumerate(segs):
        if s != start + i:
            raise _fail(data_dir / segment_name(start + i), f"is missing before {p.name}")
        if not p.is_file():
            raise _fail(p, "is not a regular file")
        report.segments.append(p.name)
        try:
            for offset, header, arrays in read_segment1(p, last=i == len(segs) - 1):
                where = f"{p} record at byte {offset}"
                try:
                    effect = from_record(header, arrays)
                except (ValueError, KeyError, TypeError) as exc:
                    raise RecoveryError(f"format-1 {where} is not a record the old server wrote: {exc}") from None
                _apply(store, effect, where, report)
                report.records += 1
        except _Torn as torn:
            report.torn_tail = f"{p.name}: {torn}"
            log.warning("upgrade: %s", report.torn_tail)
    return report


# ---- writing format 2 --------------------------------------------------------------------------------

class _Steps:
    """Numbered steps of the upgrade; the test hook SIGKILLs the process at step `kill_at`."""

    def __init__(self, kill_at: int) -> None:
        self.n, self.kill_at = 0, kill_at

    def __call__(self, what: str) -> None:
        self.n += 1
        if self.n == self.kill_at:
            log.warning("fault injection: SIGKILL at upgrade step %d (%s)", self.n, what)
            os.kill(os.getpid(), signal.SIGKILL)


def _old_seq(p: Path) -> int | None:
    """Sequence number of a `snap-<seq>`, `snap-<seq>.tmp` or `wal-<seq>.log` entry, else None."""
    name = p.name[:-4] if p.name.endswith(".tmp") and p.name.startswith("snap-") else p.name
    s = snapshot_seq(p.with_name(name))
    return s if s is not None else segment_seq(p)


def _stage(d: Path, store: MemoryStore, report: UpgradeReport, step: _Steps) -> None:
    """Write the new state in STAGING.tmp and rename it to STAGING (the commit point)."""
    tmp = d / (STAGING + ".tmp")
    remove_path(tmp)
    seqs = [s for p in d.iterdir() if (s := _old_seq(p)) is not None]
    report.new_seq = max(seqs, default=0) + 1
    tmp.mkdir()
    write_snapshot(tmp, report.new_seq, list(store.memories.values()), next_lsn=0)
    step("new snapshot written in the staging dir")
    WalWriter(tmp / segment_name(report.new_seq), report.new_seq, create=True).close()
    record = {"from_format": 1, "to_format": 2, "upgraded_unix_s": time.time(), "new_seq": report.new_seq,
              "old_snapshot": report.snapshot_seq, "old_segments": report.segments, "records": report.records,
              "torn_tail": report.torn_tail, "window_ids_dropped": report.window_ids_dropped,
              "memories": _summary(store)}
    with open(tmp / RECORD_FILE, "w") as f:
        f.write(json.dumps(record, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    step("staging dir complete")
    os.rename(tmp, d / STAGING)
    fsync_dir(d)
    step("staging dir committed")


def _summary(store: MemoryStore) -> list[dict[str, Any]]:
    return [{"name": m.name, "capacity": m.capacity, "key_dim": m.key_dim, "value_dim": m.value_dim,
             "filled": m.filled, "version": m.version} for m in store.memories.values()]


def _move(src: Path, dst: Path) -> None:
    if dst.exists():
        raise RecoveryError(f"cannot move {src} to {dst}: it exists (move it away and start again)")
    os.rename(src, dst)


def _finish(d: Path, step: _Steps, write_format: Callable[[Path], None]) -> None:
    """Move the old files into LEGACY_DIR and the staged ones into `d`, write FORMAT, tidy up."""
    staging, legacy = d / STAGING, d / LEGACY_DIR
    try:
        record = json.loads((staging / RECORD_FILE).read_bytes())
        new_seq = int(record["new_seq"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RecoveryError(f"{staging / RECORD_FILE}: unreadable ({exc}); the upgrade cannot be finished") from None
    legacy.mkdir(exist_ok=True)
    fsync_dir(d)
    step("legacy dir created")
    for p in sorted(d.iterdir()):
        s = _old_seq(p)
        if s is not None and s < new_seq:
            _move(p, legacy / p.name)
            fsync_dir(legacy)
            fsync_dir(d)
            step(f"{p.name} moved to {LEGACY_DIR}")
    for name in (snapshot_name(new_seq), segment_name(new_seq)):
        if (staging / name).exists():
            _move(staging / name, d / name)
            fsync_dir(d)
            step(f"{name} moved into the data dir")
    write_format(d)
    step("FORMAT written")
    tidy(d)
    step("staging dir removed")


def upgrade(dur: Durability, store: MemoryStore, write_format: Callable[[Path], None]) -> None:
    """Upgrade the format-1 (or half-upgraded) data dir of `dur` in place; RecoveryError when it cannot.

    `store` only lends its backend and limits: the old state is read into a scratch store, written as a
    format-2 snapshot and released; the caller's normal recovery then loads that snapshot.
    """
    d = dur.cfg.data_dir
    legacy = d / LEGACY_DIR
    resuming = (d / STAGING).is_dir()
    if not dur.cfg.upgrade:
        what = "a half-finished upgrade of a format-1 data dir" if resuming else \
            "a format-1 data dir (written by the server before format 2)"
        raise RecoveryError(f"{d} holds {what} and --no-upgrade was given, so nothing was changed. Start without "
                            f"--no-upgrade to upgrade it in place: the old files are kept in {legacy} (see "
                            f"docs/MEMORY_SERVER.md, Upgrades)")
    step = _Steps(dur.cfg.fault_upgrade_kill_at)
    if not resuming:
        if legacy.exists():
            raise RecoveryError(f"{d} holds format-1 files and {legacy} from an earlier upgrade: move {legacy} "
                                f"away (it is the user's to keep) and start again")
        scratch = MemoryStore(store.backend, None, max(store.max_memories, 1 << 30))
        scratch.attach_searchers = False
        t0 = time.monotonic()
        report = read_format1(d, scratch)
        _stage(d, scratch, report, step)
        del scratch
        log.info("upgrade: format-1 state read and staged in %.3f s", time.monotonic() - t0)
    _finish(d, step, write_format)

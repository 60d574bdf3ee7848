"""Atomic, checksummed snapshots: one directory `snap-<seq>` holding `manifest.json` and `data.bin`.

`data.bin` is every memory's arrays (and idempotency window) back to back, raw little-endian; the
manifest lists each section's memory, name, dtype, shape, offset, byte count and CRC32, and carries a
checksum of its own content. Loading verifies all of them: a missing, short, extra or mismatching byte
refuses to start, naming the file. One data file means three fsyncs per snapshot however many memories
there are (2,000 memories used to cost 20,003 fsynced files).

A snapshot is written to `snap-<seq>.tmp`, fsync'ed, renamed and the data directory fsync'ed, so a crash
leaves either the previous snapshot or the new one; a failed write removes its tmp directory. `seq` is
the first WAL segment replayed on top of it. Never pickle: raw arrays, JSON and msgpack only.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .protocol import DTYPES, check_memory_name, short_repr
from .store import PERSISTENT_ARRAYS, Memory, MemoryStore, WindowEntry, layout
from .wal import fsync_dir

SNAPSHOT_FORMAT = 2
DATA_FILE = "data.bin"
MANIFEST = "manifest.json"
_READ_CHUNK = 8 << 20
_WINDOW_SECTIONS = ("window_ids", "window_meta", "window_hit", "window_slots")
INDEX_SECTION = "index"  # optional: a serialised approximate index (--index approximate), uint8


class SnapshotCorrupt(RuntimeError):
    """A complete-looking snapshot directory that cannot be loaded."""


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:08d}"


def snapshot_seq(path: Path) -> int | None:
    """Sequence number of a complete snapshot directory name, else None (tmp dirs are not complete)."""
    name = path.name
    if name.startswith("snap-") and name[5:].isdigit():
        return int(name[5:])
    return None


def complete_snapshots(data_dir: Path) -> list[tuple[int, Path]]:
    """Complete snapshot entries (named snap-<digits>), oldest first."""
    found = [(s, p) for p in data_dir.iterdir() if (s := snapshot_seq(p)) is not None]
    return sorted(found)


def remove_path(path: Path) -> None:
    """Delete a file or a directory tree (leftovers named like ours)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _manifest_checksum(body: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _window_sections(window: OrderedDict[Any, WindowEntry]) -> list[tuple[str, np.ndarray]]:
    ids = list(window.keys())
    meta = np.empty((len(ids), 2), np.int64)  # version, rows (-1 for a put reply)
    hits, slots = [], []
    for i, entry in enumerate(window.values()):
        meta[i, 0] = entry.version
        if entry.hit is None:
            meta[i, 1] = -1
        else:
            meta[i, 1] = entry.hit.size
            hits.append(entry.hit)
            slots.append(entry.slots)
    return [("window_ids", np.frombuffer(msgpack.packb(ids, use_bin_type=True), np.uint8)),
            ("window_meta", meta),
            ("window_hit", np.concatenate(hits) if hits else np.empty(0, bool)),
            ("window_slots", np.concatenate(slots).astype(np.int32) if slots else np.empty(0, np.int32))]


def _dtype_name(a: np.ndarray) -> str:
    return "float64" if a.dtype == np.float64 else next(k for k, v in DTYPES.items() if v == a.dtype)


def write_snapshot(data_dir: Path, seq: int, memories: list[Memory], next_lsn: int, pause_s: float = 0.0,
                   fail_after_bytes: int | None = None) -> Path:
    """Write snapshot `seq` of `memories` atomically; returns its final path. On failure nothing is left.

    `pause_s` > 0 sleeps after the files are written and before the rename (a test hook that holds the
    crash window open); `fail_after_bytes` makes the write fail with ENOSPC (a test hook).
    """
    final = data_dir / snapshot_name(seq)
    tmp = data_dir / (snapshot_name(seq) + ".tmp")
    remove_path(tmp)
    try:
        tmp.mkdir()
        entries, offset = [], 0
        with open(tmp / DATA_FILE, "wb") as f:
            for mem in memories:
                sections = [(n, getattr(mem, n)) for n in PERSISTENT_ARRAYS] + _window_sections(mem.window)
                index_state = getattr(mem.searcher, "state", None)
                state = index_state() if index_state is not None else None
                if state is not None:  # saved so a restart need not train and fill the index again
                    sections.append((INDEX_SECTION, state))
                described = []
                for name, arr in sections:
                    arr = np.ascontiguousarray(arr)
                    view = memoryview(arr).cast("B") if arr.nbytes else b""
                    if fail_after_bytes is not None and offset + arr.nbytes > fail_after_bytes:
                        raise OSError(28, "No space left on device (injected by --fault-snapshot-fail)")
                    f.write(view)
                    described.append([name, _dtype_name(arr), list(arr.shape), offset, arr.nbytes, zlib.crc32(view)])
                    offset += arr.nbytes
                entries.append({"name": mem.name, "capacity": mem.capacity, "key_dim": mem.key_dim,
                                "value_dim": mem.value_dim, "version": mem.version, "hits": mem.hits,
                                "misses": mem.misses, "seed": mem.seed, "sections": described})
            f.flush()
            os.fsync(f.fileno())
        body = {"format": SNAPSHOT_FORMAT, "wal_seq": seq, "next_lsn": next_lsn, "created_unix_s": time.time(),
                "data_bytes": offset, "memories": entries}
        manifest = dict(body, checksum=_manifest_checksum(body))
        with open(tmp / MANIFEST, "wb") as f:
            f.write(json.dumps(manifest, indent=1).encode())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if pause_s > 0:
            time.sleep(pause_s)
        os.rename(tmp, final)
    except BaseException:
        remove_path(tmp)
        raise
    fsync_dir(data_dir)
    return final


# ---- loading ---------------------------------------------------------------------------------------

def _bad(path: Path, what: str) -> SnapshotCorrupt:
    return SnapshotCorrupt(f"{path}: {what}")


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_bytes())
    except FileNotFoundError:
        raise _bad(mpath, "missing (a renamed snapshot is always complete: the directory is damaged)") from None
    except (OSError, ValueError) as exc:
        raise _bad(mpath, f"unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict):
        raise _bad(mpath, f"is a JSON {type(manifest).__name__}, not an object")
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    if manifest.get("checksum") != _manifest_checksum(body):
        raise _bad(mpath, "checksum mismatch (the manifest was changed or damaged)")
    if body.get("format") != SNAPSHOT_FORMAT:
        raise _bad(mpath, f"snapshot format {short_repr(body.get('format'))}, expected {SNAPSHOT_FORMAT}")
    return body


def _int(x: Any, what: str, path: Path) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise _bad(path, f"{what} is {short_repr(x)}, not an int >= 0")
    return x


def _read_section(f: Any, spec: Any, path: Path, mem_name: str, data_bytes: int) -> tuple[str, np.ndarray]:
    """One section, read at the current position of `f` (sections are contiguous) and checksummed."""
    if not (isinstance(spec, list) and len(spec) == 6 and isinstance(spec[0], str) and spec[1] in (*DTYPES, "float64")
            and isinstance(spec[2], list)):
        raise _bad(path / MANIFEST, f"memory {mem_name!r}: malformed section entry {short_repr(spec)}")
    name, dtype_name, shape, offset, nbytes, crc = spec
    dtype = np.dtype("<f8") if dtype_name == "float64" else DTYPES[dtype_name]
    shape = tuple(_int(d, f"{name} dimension", path / MANIFEST) for d in shape)
    count = dtype.itemsize
    for d in shape:
        count *= d
    if count != _int(nbytes, f"{name} byte count", path / MANIFEST) or _int(offset, "offset", path) != f.tell() \
            or offset + nbytes > data_bytes:
        raise _bad(path / MANIFEST, f"memory {mem_name!r} section {name}: {dtype_name}{list(shape)} at byte {offset} "
                                    f"does not fit the {data_bytes}-byte data file")
    arr = np.empty(shape, dtype)  # bounded: it fits a file of known size
    view = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
    got, running = 0, 0
    while got < arr.nbytes:
        n = f.readinto(view[got:got + _READ_CHUNK])
        if not n:
            raise _bad(path / DATA_FILE, f"memory {mem_name!r} section {name} ends at byte {offset + got}, "
                                         f"short of {offset + arr.nbytes}")
        running = zlib.crc32(view[got:got + n], running)
        got += n
    if running != crc:
        raise _bad(path / DATA_FILE, f"memory {mem_name!r} section {name} (bytes {offset}..{offset + nbytes}) "
                                     f"fails its checksum")
    return name, arr


def _window(sections: dict[str, np.ndarray], path: Path, name: str) -> OrderedDict[Any, WindowEntry]:
    try:
        ids = msgpack.unpackb(sections["window_ids"].tobytes(), raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise _bad(path, f"memory {name!r}: window ids do not parse ({exc})") from None
    meta, hit_all, slot_all = sections["window_meta"], sections["window_hit"], sections["window_slots"]
    if not isinstance(ids, list) or meta.ndim != 2 or len(ids) != meta.shape[0]:
        raise _bad(path, f"memory {name!r}: window ids and entries disagree")
    window: OrderedDict[Any, WindowEntry] = OrderedDict()
    pos = 0
    for req_id, (version, rows) in zip(ids, meta.tolist(), strict=True):
        if rows < 0:
            window[req_id] = WindowEntry(version)
        else:
            window[req_id] = WindowEntry(version, hit_all[pos:pos + rows].copy(), slot_all[pos:pos + rows].copy())
            pos += rows
    if pos != hit_all.size or pos != slot_all.size:
        raise _bad(path, f"memory {name!r}: window rows disagree with the window arrays")
    return window


def _load_memory(f: Any, path: Path, entry: Any, data_bytes: int, value_dtype: str = "float32") -> Memory:
    if not isinstance(entry, dict):
        raise _bad(path / MANIFEST, f"memory entry is {type(entry).__name__}")
    name = entry.get("name")
    try:
        check_memory_name(name)
    except Exception:
        raise _bad(path / MANIFEST, f"memory name {short_repr(name)} is invalid") from None
    m, dk, dv = (_int(entry.get(k), k, path / MANIFEST) for k in ("capacity", "key_dim", "value_dim"))
    specs = entry.get("sections")
    if not isinstance(specs, list):
        raise _bad(path / MANIFEST, f"memory {name!r} has no section list")
    sections = dict(_read_section(f, spec, path, name, data_bytes) for spec in specs)
    expected = {n: layout(m, dk, dv)[n] for n in PERSISTENT_ARRAYS}
    index_state = sections.pop(INDEX_SECTION, None)
    if set(sections) != set(expected) | set(_WINDOW_SECTIONS):
        raise _bad(path / MANIFEST, f"memory {name!r} sections {sorted(sections)} are not the expected ones")
    for n, (shape, dtype) in expected.items():
        # values may have been held as float16 or float32 (--value-dtype of the server that wrote them)
        ok_dtype = sections[n].dtype in (np.float32, np.float16) if n == "values" else sections[n].dtype == dtype
        if sections[n].shape != shape or not ok_dtype:
            raise _bad(path / MANIFEST, f"memory {name!r} section {n} is {sections[n].dtype}{list(sections[n].shape)}, "
                                        f"expected {dtype}{list(shape)}")
    values, negent = sections["values"], sections["negent"]
    if values.dtype != np.dtype(value_dtype):  # --value-dtype changed between runs: convert, recompute negent
        values, negent = values.astype(value_dtype), None
    if index_state is not None and index_state.dtype != np.uint8:
        raise _bad(path / MANIFEST, f"memory {name!r} section {INDEX_SECTION} is {index_state.dtype}, expected uint8")
    mem = Memory(name, sections["keys"], values, sections["ages"], sections["item_ids"],
                 sections["written"], version=_int(entry.get("version"), "version", path / MANIFEST),
                 hits=_int(entry.get("hits"), "hits", path / MANIFEST),
                 misses=_int(entry.get("misses"), "misses", path / MANIFEST),
                 seed=_int(entry.get("seed"), "seed", path / MANIFEST), negent=negent)
    mem.index_state = index_state
    for req_id, window_entry in _window(sections, path, name).items():
        mem._remember(req_id, window_entry)
    return mem


def load_snapshot(path: Path, store: MemoryStore) -> tuple[int, int]:
    """Load a complete snapshot directory into `store`; returns (wal_seq, next_lsn). SnapshotCorrupt if damaged."""
    if not path.is_dir():
        raise _bad(path, "is not a directory")
    body = _read_manifest(path)
    seq = _int(body.get("wal_seq"), "wal_seq", path / MANIFEST)
    next_lsn = _int(body.get("next_lsn"), "next_lsn", path / MANIFEST)
    data_bytes = _int(body.get("data_bytes"), "data_bytes", path / MANIFEST)
    entries = body.get("memories")
    if not isinstance(entries, list):
        raise _bad(path / MANIFEST, "has no memory list")
    data = path / DATA_FILE
    try:
        size = data.stat().st_size
        if size != data_bytes:
            raise _bad(data, f"has {size} bytes, the manifest says {data_bytes}")
        with open(data, "rb") as f:
            for entry in entries:
                mem = _load_memory(f, path, entry, data_bytes, getattr(store, "value_dtype", "float32"))
                if mem.name in store.memories:
                    raise _bad(path / MANIFEST, f"memory {mem.name!r} is listed twice")
                store.add(mem)
            if f.tell() != data_bytes:
                raise _bad(data, f"sections cover {f.tell()} of its {data_bytes} bytes")
    except FileNotFoundError:
        raise _bad(data, "missing") from None
    except OSError as exc:
        raise _bad(data, f"unreadable ({exc})") from None
    return seq, next_lsn

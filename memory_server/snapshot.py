"""Atomic snapshots: one directory `snap-<seq>` holding a JSON manifest and .npy files per memory.

A snapshot is written to `snap-<seq>.tmp`, every file and directory fsync'ed, then renamed and the
data directory fsync'ed, so a crash leaves either the previous snapshot or the new one. `seq` is the
first WAL segment that recovery replays on top of it. Never pickle: numpy .npy (allow_pickle=False),
JSON and msgpack only. Directory names derive from a hash of the validated memory name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from .store import Memory, WindowEntry
from .wal import fsync_dir

SNAPSHOT_FORMAT = 1
_ARRAYS = ("keys", "values", "ages", "item_ids", "written", "negent")


class SnapshotCorrupt(RuntimeError):
    """A complete-looking snapshot directory that cannot be loaded."""


def snapshot_name(seq: int) -> str:
    return f"snap-{seq:08d}"


def snapshot_seq(path: Path) -> int | None:
    """Sequence number of a complete snapshot directory name, else None (tmp dirs are not complete)."""
    name = path.name
    if name.startswith("snap-") and name[5:].isdigit() and path.is_dir():
        return int(name[5:])
    return None


def memory_dirname(name: str) -> str:
    """On-disk directory of a memory: a hash, so no request byte ever becomes a path."""
    return "mem-" + hashlib.sha256(name.encode("utf-8")).hexdigest()[:20]


def _write_file(path: Path, write: Any) -> int:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
        return f.tell()


def _save_npy(path: Path, arr: np.ndarray) -> int:
    return _write_file(path, lambda f: np.save(f, arr, allow_pickle=False))


def _window_arrays(window: OrderedDict[Any, WindowEntry]) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]:
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
    hit_all = np.concatenate(hits) if hits else np.empty(0, bool)
    slot_all = np.concatenate(slots).astype(np.int32) if slots else np.empty(0, np.int32)
    return ids, meta, hit_all, slot_all


def _write_memory(dirpath: Path, mem: Memory) -> dict[str, Any]:
    dirpath.mkdir()
    files: dict[str, int] = {}
    for name in _ARRAYS:
        files[f"{name}.npy"] = _save_npy(dirpath / f"{name}.npy", getattr(mem, name))
    ids, meta, hit_all, slot_all = _window_arrays(mem.window)
    files["window_ids.msgpack"] = _write_file(dirpath / "window_ids.msgpack",
                                              lambda f: f.write(msgpack.packb(ids, use_bin_type=True)))
    files["window_meta.npy"] = _save_npy(dirpath / "window_meta.npy", meta)
    files["window_hit.npy"] = _save_npy(dirpath / "window_hit.npy", hit_all)
    files["window_slots.npy"] = _save_npy(dirpath / "window_slots.npy", slot_all)
    fsync_dir(dirpath)
    return {"name": mem.name, "dir": dirpath.name, "capacity": mem.capacity, "key_dim": mem.key_dim,
            "value_dim": mem.value_dim, "version": mem.version, "hits": mem.hits, "misses": mem.misses,
            "seed": mem.seed, "files": files}


def write_snapshot(data_dir: Path, seq: int, memories: list[Memory], pause_s: float = 0.0) -> Path:
    """Write snapshot `seq` of `memories` atomically; returns its final path.

    `pause_s` > 0 sleeps after the files are written and before the rename: a test hook that holds the
    crash window of an in-progress snapshot open.
    """
    final = data_dir / snapshot_name(seq)
    tmp = data_dir / (snapshot_name(seq) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    entries = [_write_memory(tmp / memory_dirname(mem.name), mem) for mem in memories]
    manifest = {"format": SNAPSHOT_FORMAT, "wal_seq": seq, "created_unix_s": time.time(), "memories": entries}
    _write_file(tmp / "manifest.json", lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    fsync_dir(tmp)
    if pause_s > 0:
        time.sleep(pause_s)
    os.rename(tmp, final)
    fsync_dir(data_dir)
    return final


def _load_npy(path: Path, size: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if path.stat().st_size != size:
        raise SnapshotCorrupt(f"{path} has {path.stat().st_size} bytes, the manifest says {size}")
    arr = np.load(path, allow_pickle=False)
    if arr.dtype != np.dtype(dtype) or arr.shape != shape:
        raise SnapshotCorrupt(f"{path}: {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}")
    return np.ascontiguousarray(arr)


def _load_memory(dirpath: Path, entry: dict[str, Any]) -> Memory:
    m, dk, dv = entry["capacity"], entry["key_dim"], entry["value_dim"]
    files = entry["files"]
    spec = {"keys": ("float32", (m, dk)), "values": ("float32", (m, dv)), "ages": ("float32", (m,)),
            "item_ids": ("int64", (m,)), "written": ("bool", (m,)), "negent": ("float64", (m,))}
    arrs = {n: _load_npy(dirpath / f"{n}.npy", files[f"{n}.npy"], *spec[n]) for n in _ARRAYS}
    mem = Memory(entry["name"], arrs["keys"], arrs["values"], arrs["ages"], arrs["item_ids"], arrs["written"],
                 version=entry["version"], hits=entry["hits"], misses=entry["misses"], seed=entry["seed"],
                 negent=arrs["negent"])
    ids = msgpack.unpackb((dirpath / "window_ids.msgpack").read_bytes(), raw=False, strict_map_key=False)
    meta = np.load(dirpath / "window_meta.npy", allow_pickle=False)
    hit_all = np.load(dirpath / "window_hit.npy", allow_pickle=False)
    slot_all = np.load(dirpath / "window_slots.npy", allow_pickle=False)
    if len(ids) != meta.shape[0]:
        raise SnapshotCorrupt(f"{dirpath}: {len(ids)} window ids but {meta.shape[0]} window entries")
    pos = 0
    for req_id, (version, rows) in zip(ids, meta.tolist(), strict=True):
        if rows < 0:
            mem.window[req_id] = WindowEntry(version)
        else:
            mem.window[req_id] = WindowEntry(version, hit_all[pos:pos + rows].copy(), slot_all[pos:pos + rows].copy())
            pos += rows
    return mem


def load_snapshot(path: Path) -> tuple[int, list[Memory]]:
    """(wal_seq, memories) of a complete snapshot directory."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest.get("format") != SNAPSHOT_FORMAT:
            raise SnapshotCorrupt(f"{path}: snapshot format {manifest.get('format')!r}, expected {SNAPSHOT_FORMAT}")
        mems = []
        for e in manifest["memories"]:
            if e["dir"] != memory_dirname(e["name"]):
                raise SnapshotCorrupt(f"{path}: memory {e['name']!r} listed in directory {e['dir']!r}")
            mems.append(_load_memory(path / e["dir"], e))
        return int(manifest["wal_seq"]), mems
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SnapshotCorrupt(f"cannot load snapshot {path}: {type(exc).__name__}: {exc}") from exc


def complete_snapshots(data_dir: Path) -> list[tuple[int, Path]]:
    """Complete snapshot directories, oldest first."""
    found = [(s, p) for p in data_dir.iterdir() if (s := snapshot_seq(p)) is not None]
    return sorted(found)

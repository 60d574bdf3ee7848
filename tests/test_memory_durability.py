"""In-process tests of the WAL, snapshots and recovery (no server process)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from memserver_helpers import UpdateStream, assert_same_state

from memory_server.durability import DataDirLocked, Durability, DurabilityConfig, RecoveryError
from memory_server.local import InProcessMemory
from memory_server.store import MemoryStore
from memory_server.wal import TornTail, WalCorrupt, WalWriter, read_segment


def _open(data_dir, mode="always", fork=False, **kw):
    return InProcessMemory(None, data_dir=data_dir, durability=mode, backend="faiss", **kw)


def _run(mem, n, seed=0, batch=6):
    stream = UpdateStream(16, 8, seed=seed, batch=batch)
    return [mem.update(**stream.next()) for _ in range(n)]


def _segments(d):
    return sorted(d.glob("wal-*.log"))


def _write_records(path, n, size=50):
    """n records in a new segment; returns the end offset of each."""
    w = WalWriter(path, 1, create=True)
    ends = []
    for i in range(n):
        w.append({"t": "r", "i": i}, [("a", np.full(size, i, np.float32))])
        ends.append(w.size)
    w.close()
    return ends


def test_wal_roundtrip(tmp_path):
    w = WalWriter(tmp_path / "wal-00000001.log", 1, create=True)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    w.append({"t": "x", "n": 1}, [("a", a), ("b", np.array([True, False]))])
    w.append({"t": "y"}, [])
    w.sync()
    w.close()
    recs = list(read_segment(tmp_path / "wal-00000001.log", last=False))
    assert [h["t"] for _, h, _ in recs] == ["x", "y"]
    np.testing.assert_array_equal(recs[0][2]["a"], a)
    np.testing.assert_array_equal(recs[0][2]["b"], [True, False])


@pytest.mark.parametrize("cut", [1, 7, 8, 100, -1])
def test_torn_tail_is_truncated_and_earlier_records_kept(tmp_path, cut):
    path = tmp_path / "wal-00000001.log"
    ends = _write_records(path, 3)
    with open(path, "r+b") as f:
        f.truncate(ends[1] + cut if cut > 0 else ends[2] - 1)  # cut inside the last record
    seen = []
    with pytest.raises(TornTail) as info:
        for _, h, _ in read_segment(path, last=True):
            seen.append(h["i"])
    assert seen == [0, 1]
    assert path.stat().st_size == info.value.offset == ends[1]


def test_corrupt_middle_record_is_not_a_torn_tail(tmp_path):
    path = tmp_path / "wal-00000001.log"
    ends = _write_records(path, 3)
    data = bytearray(path.read_bytes())
    data[ends[0] + 40] ^= 0xFF  # flip a byte inside record 1
    path.write_bytes(bytes(data))
    with pytest.raises(WalCorrupt, match="not a torn tail"):
        list(read_segment(path, last=True))


def test_zeroed_tail_counts_as_torn(tmp_path):
    path = tmp_path / "wal-00000001.log"
    _write_records(path, 1)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)  # a file system that extended the file but lost the data
    with pytest.raises(TornTail):
        list(read_segment(path, last=True))


def test_recovery_from_wal_only_is_exact_and_keeps_window(tmp_path):
    mem = _open(tmp_path, capacity=64, key_dim=16, value_dim=8, seed=3)
    replies = _run(mem, 12)
    live = mem.export()
    mem.engine.durability.close(mem.store, final_snapshot=False)  # like a crash: no snapshot
    assert not list(tmp_path.glob("snap-*"))
    back = _open(tmp_path)
    assert_same_state(back.export(), live)
    assert back.export()["version"] == 12
    # The idempotency window came back from the log: the same id gets the first reply.
    last_id = next(iter(reversed(back.store.memories["default"].window)))
    again = back.update(np.ones((1, 16)), np.ones((1, 8)), threshold=0.0, request_id=last_id)
    np.testing.assert_array_equal(again["slots"], replies[-1]["slots"])
    assert back.info()["version"] == 12


@pytest.mark.parametrize("fork", [False, True], ids=["sync", "fork"])
def test_snapshot_then_replay_is_exact(tmp_path, fork):
    mem = _open(tmp_path, capacity=64, key_dim=16, value_dim=8, seed=3)
    mem.engine.durability.cfg.fork_snapshots = fork
    _run(mem, 8)
    assert mem.snapshot()["version"] == 8
    snaps = list(tmp_path.glob("snap-*"))
    assert len(snaps) == 1 and not snaps[0].name.endswith(".tmp")
    assert len(_segments(tmp_path)) == 1  # the log before the snapshot is gone
    _run(mem, 5, seed=1)
    mem.create(10, 4, 3, seed=1, memory="second")
    mem.put([1], [[1, 0, 0, 0]], [[1, 2, 3]], memory="second")
    live, live2 = mem.export(), mem.export(memory="second")
    mem.engine.durability.close(mem.store, final_snapshot=False)
    back = _open(tmp_path)
    assert_same_state(back.export(), live)
    assert_same_state(back.export(memory="second"), live2)
    assert back.stats()["hits"] == mem.stats()["hits"]


def test_interrupted_snapshot_leaves_previous_usable(tmp_path):
    mem = _open(tmp_path, capacity=32, key_dim=16, value_dim=8, seed=2)
    _run(mem, 4)
    mem.snapshot()
    _run(mem, 3, seed=5)
    live = mem.export()
    mem.engine.durability.close(mem.store, final_snapshot=False)
    tmp = tmp_path / "snap-99999999.tmp"  # a crash mid-snapshot leaves a tmp dir with partial files
    tmp.mkdir()
    (tmp / "manifest.json").write_text("{not json")
    back = _open(tmp_path)
    assert_same_state(back.export(), live)
    assert not tmp.exists()


def test_drop_survives_restart_and_files_go(tmp_path):
    mem = _open(tmp_path, capacity=16, key_dim=4, value_dim=3, seed=2)
    mem.create(8, 4, 3, memory="gone")
    mem.snapshot()
    mem.drop(memory="gone")
    mem.engine.durability.close(mem.store, final_snapshot=False)
    back = _open(tmp_path)
    assert back.info()["memories"] == ["default"]
    snap = sorted(tmp_path.glob("snap-*"))[-1]
    manifest = json.loads((snap / "manifest.json").read_text())
    assert [m["name"] for m in manifest["memories"]] == ["default"]  # the dropped memory's bytes are gone
    assert (snap / "data.bin").stat().st_size == manifest["data_bytes"]


def test_corrupt_log_in_the_middle_stops_recovery(tmp_path):
    mem = _open(tmp_path, capacity=16, key_dim=16, value_dim=8, seed=2)
    _run(mem, 4)
    mem.engine.durability.close(mem.store, final_snapshot=False)
    seg = _segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(RecoveryError):
        Durability(DurabilityConfig(data_dir=tmp_path)).open(MemoryStore())


def test_data_dir_lock(tmp_path):
    first = Durability(DurabilityConfig(data_dir=tmp_path))
    first.open(MemoryStore())
    with pytest.raises(DataDirLocked, match=str(os.getpid())):
        Durability(DurabilityConfig(data_dir=tmp_path, lock_timeout_s=0.2)).open(MemoryStore())
    first.close(MemoryStore(), final_snapshot=False)


def test_batch_mode_syncs_in_background(tmp_path):
    mem = _open(tmp_path, mode="batch", capacity=16, key_dim=16, value_dim=8, seed=2)
    dur = mem.engine.durability
    dur.cfg.batch_interval_s = 0.05
    _run(mem, 3)
    assert not dur.dirty  # batch never holds replies
    for _ in range(100):
        if not dur._dirty:
            break
        dur._stop.wait(0.05)
    assert not dur._dirty, "the group-commit thread must sync within its interval"
    mem.close()
    assert _open(tmp_path).info()["version"] == 3

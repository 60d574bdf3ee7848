"""Regression tests of issue 10's defects that need no server process: the engine, the durability layer
and recovery driven in-process (the server runs exactly this code; the exit codes come from cli.main).

Each test failed on the code before the fix; the defect number of the issue is in its name.
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np
import pytest
from memserver_helpers import UpdateStream, assert_same_state, header_bytes

from memory_server import cli
from memory_server.durability import Durability, DurabilityConfig, RecoveryError
from memory_server.effects import CreateEffect, PutEffect, UpdateEffect
from memory_server.local import InProcessMemory
from memory_server.protocol import BadDtype, BadRequest, BadValue, Internal, TooLarge
from memory_server.store import MemoryStore

SHAPE = {"capacity": 32, "key_dim": 16, "value_dim": 8}


def _durable(path, mode="always", **kw):
    return InProcessMemory(None, data_dir=path, durability=mode, backend="faiss", **kw)


def _history(path, n_updates=4, snapshot_after=None):
    """A data dir holding `default` + n updates; returns (live export, WAL size after each request)."""
    mem = _durable(path)
    seg = path / "wal-00000001.log"
    sizes = []
    mem.create(**SHAPE, seed=3)
    sizes.append(seg.stat().st_size)
    stream = UpdateStream(16, 8, seed=1, batch=4)
    for i in range(n_updates):
        mem.update(**stream.next())
        sizes.append(seg.stat().st_size if seg.exists() else None)
        if snapshot_after == i:
            mem.snapshot()
    live = mem.export()
    mem.engine.durability.close(mem.store, final_snapshot=False)  # like kill -9 after the last fsync
    return live, sizes


def _recover(path, **store_kw):
    store = MemoryStore("faiss-cpu", **store_kw)
    dur = Durability(DurabilityConfig(data_dir=path))
    try:
        return dur.open(store), store
    finally:
        dur.close(store, final_snapshot=False)


def _log_effects(path, effects):
    """Append hand-made effects to the data dir's log through the server's own Durability."""
    store = MemoryStore("faiss-cpu")
    dur = Durability(DurabilityConfig(data_dir=path))
    dur.open(store)
    for e in effects:
        dur.log(e)
    dur.commit()
    dur.close(store, final_snapshot=False)


# ---- defect 1: no exception of any kind ends the server ---------------------------------------------

def test_d1_any_exception_while_handling_a_request_answers_internal(monkeypatch):
    mem = InProcessMemory(**SHAPE, seed=1, backend="faiss")
    before = mem.export()

    def explode(*a, **k):
        raise ValueError("array is too big")  # what numpy raised for a 0-byte frame with a huge shape

    monkeypatch.setattr("memory_server.engine.decode_arrays", explode)
    reply = mem.engine.handle_frames([header_bytes(v=1, op="get", id=7, arrays=[["slots", "int64", [1]]]),
                                      np.zeros(1, np.int64).tobytes()])
    assert reply.error is not None and reply.error.code == "internal" and reply.req_id == 7
    assert "ValueError" in reply.error.message
    monkeypatch.undo()
    assert_same_state(mem.export(), before)


def test_d1_failure_after_logging_is_undone_in_the_log(tmp_path):
    mem = _durable(tmp_path)
    mem.create(**SHAPE, seed=3)
    stream = UpdateStream(16, 8, seed=2, batch=4)
    mem.update(**stream.next())
    before = mem.export()
    seg = tmp_path / "wal-00000001.log"
    size = seg.stat().st_size
    mem.engine.fault_prepare_ops = frozenset({"update"})  # applying fails after the record is written
    with pytest.raises(Internal, match="MemoryError"):
        mem.update(**stream.next())
    assert seg.stat().st_size == size, "the record of the failed update must leave the log"
    mem.engine.fault_prepare_ops = frozenset()
    assert mem.update(**stream.next())["version"] == 2  # and the server goes on
    after = mem.export()
    mem.engine.durability.close(mem.store, final_snapshot=False)
    back = _durable(tmp_path)
    assert_same_state(back.export(), after)
    assert back.info()["version"] == 2 and before["version"] == 1


# ---- defect 2: accounting checked before logging, recovery survives a record it cannot apply --------

def test_d2_recovery_refuses_a_create_it_cannot_apply(tmp_path):
    _history(tmp_path, n_updates=1)
    _log_effects(tmp_path, [CreateEffect("huge", 2**40, 512, 313, 1)])  # as if logged before RAM ran out
    code = cli.main(["--data-dir", str(tmp_path), "--backend", "faiss", "--lock-timeout-s", "1"])
    assert code == 4  # a clear refusal, not a traceback (exit 1) that a supervisor restarts forever


def test_d2_recovery_refuses_more_than_max_memory_bytes(tmp_path):
    _history(tmp_path, n_updates=1)
    with pytest.raises(RecoveryError, match="--max-memory-bytes"):
        _recover(tmp_path, max_memory_bytes=50_000)


def test_d2_create_counts_scratch_search_and_minimum(tmp_path):
    mem = InProcessMemory(backend="faiss", max_memory_bytes=10 * 1024 * 1024)
    mem.create(1000, 8, 4, seed=1, memory="a")
    nbytes = mem.info(memory="a")["nbytes"]
    old_accounting = 1000 * (4 * 8 + 4 * 4 + 4 + 8)
    assert nbytes >= 64 * 1024 > old_accounting  # at least 64 KiB per memory
    mem.create(100_000, 8, 4, seed=1, memory="b")
    per_slot = 4 * 8 + 4 * 4 + 4 + 8 + 1 + 8 + 4 + 8 + 8 + 8  # + written, negent, 4 scratch arrays
    assert mem.info(memory="b")["nbytes"] >= 100_000 * per_slot
    with pytest.raises(TooLarge, match="max-memory-bytes"):  # 60 B/slot fits the old count, 97 B/slot does not
        mem.create(60_000, 8, 4, memory="c")


# ---- defect 3: a corrupt length field refuses to start; only a torn tail is cut -----------------------

@pytest.mark.parametrize("how", ["zero", "huge", "bitflip"])
def test_d3_corrupt_wal_length_refuses_instead_of_cutting(tmp_path, how):
    live, sizes = _history(tmp_path, n_updates=4)
    seg = tmp_path / "wal-00000001.log"
    start = sizes[1]  # the record of the second update: acknowledged records follow it
    raw = bytearray(seg.read_bytes())
    (length,) = struct.unpack_from("<I", raw, start)
    new = {"zero": 0, "huge": 0xFFFFFF00, "bitflip": length ^ (1 << 20)}[how]
    struct.pack_into("<I", raw, start, new)
    seg.write_bytes(bytes(raw))
    with pytest.raises(RecoveryError):
        _recover(tmp_path)
    assert seg.read_bytes() == bytes(raw), "nothing may be cut from a log that is not torn"


def test_d3_bitflip_in_the_last_record_is_not_a_torn_tail(tmp_path):
    _, sizes = _history(tmp_path, n_updates=3)
    seg = tmp_path / "wal-00000001.log"
    raw = bytearray(seg.read_bytes())
    raw[(sizes[-2] + sizes[-1]) // 2] ^= 0x04  # inside the last, acknowledged record
    seg.write_bytes(bytes(raw))
    with pytest.raises(RecoveryError):
        _recover(tmp_path)


def test_d3_truncated_last_record_is_cut_to_the_records_before(tmp_path):
    live, sizes = _history(tmp_path, n_updates=3)
    seg = tmp_path / "wal-00000001.log"
    os.truncate(seg, sizes[-1] - 7)
    report, store = _recover(tmp_path)
    assert report.torn_tail and store.memories["default"].version == 2


# ---- defect 4: a snapshot that cannot be taken never fails a reply, is counted and retried --------------

def test_d4_failed_fork_neither_ends_the_server_nor_fails_the_drop(tmp_path, monkeypatch):
    mem = _durable(tmp_path)
    mem.create(**SHAPE, seed=3)
    mem.create(4, 4, 3, seed=1, memory="gone")
    dur = mem.engine.durability
    dur.cfg.fork_snapshots = True

    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    assert mem.drop(memory="gone") == {}  # applied, so `ok`, whatever its snapshot does
    with pytest.raises(Internal, match="fork"):
        mem.snapshot()
    assert dur.failures_total >= 2 and dur.next_attempt > 0
    assert not list(tmp_path.glob("snap-*")), "no temporary files are left behind"
    monkeypatch.undo()
    assert mem.snapshot()["version"] == 0  # retried, now durable
    assert [p.name for p in tmp_path.glob("snap-*")] == [f"snap-{dur.snap_seq:08d}"]
    assert mem.stats()["snapshot_failures"] == dur.failures_total


# ---- defect 5: bounded ids, arguments, tiny memories ----------------------------------------------

def test_d5_request_ids_are_bounded():
    mem = InProcessMemory(**SHAPE, seed=1, backend="faiss")
    q, v = np.ones((1, 16), np.float32), np.ones((1, 8), np.float32)
    assert mem.update(q, v, threshold=0.1, request_id="x" * 256)["version"] == 1
    for bad in ("x" * 257, "é" * 129, 2**63, -(2**63) - 1):
        with pytest.raises(BadRequest, match="'id'"):
            mem.update(q, v, threshold=0.1, request_id=bad)
    assert mem.update(q, v, threshold=0.1, request_id=2**63 - 1)["version"] == 2
    assert mem.info()["version"] == 2


def test_d5_many_tiny_memories_snapshot_into_few_files(tmp_path):
    mem = _durable(tmp_path, mode="batch")
    for i in range(300):
        mem.create(2, 2, 2, seed=i, memory=f"m{i}")
    mem.snapshot()
    snap = next(tmp_path.glob("snap-????????"))
    files = [p for p in snap.rglob("*") if p.is_file()]
    assert len(files) <= 3, f"{len(files)} files (and as many fsyncs) for one snapshot"
    assert mem.stats()["memory_bytes"] >= 300 * 64 * 1024  # each memory counts at least 64 KiB
    mem.close()
    assert len(_durable(tmp_path).info()["memories"]) == 300


def test_d5_max_memories(tmp_path):
    mem = InProcessMemory(backend="faiss", max_memories=3)
    for i in range(3):
        mem.create(2, 2, 2, memory=f"m{i}")
    with pytest.raises(TooLarge, match="max-memories"):
        mem.create(2, 2, 2, memory="m3")
    mem.drop(memory="m0")
    assert mem.create(2, 2, 2, memory="m3")["version"] == 0


# ---- defect 6: snapshots carry checksums ---------------------------------------------------------

def _largest_snapshot_file(path):
    snap = max(path.glob("snap-????????"))
    return max((p for p in snap.rglob("*") if p.is_file() and p.name != "manifest.json"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["bitflip", "nan"])
def test_d6_damaged_snapshot_data_refuses_to_start(tmp_path, damage):
    _history(tmp_path, n_updates=2, snapshot_after=1)
    target = _largest_snapshot_file(tmp_path)
    raw = bytearray(target.read_bytes())
    mid = len(raw) // 2
    if damage == "bitflip":
        raw[mid] ^= 0x01
    else:
        raw[mid & ~3: (mid & ~3) + 4] = struct.pack("<f", float("nan"))
    target.write_bytes(bytes(raw))
    with pytest.raises(RecoveryError, match=target.name):
        _recover(tmp_path)


def test_d6_deleted_snapshot_refuses_to_start(tmp_path):
    _history(tmp_path, n_updates=2, snapshot_after=0)
    mem = _durable(tmp_path)
    mem.create(4, 4, 3, seed=1, memory="after")  # logged after the snapshot, so recovery has a log to replay
    mem.engine.durability.close(mem.store, final_snapshot=False)
    for snap in tmp_path.glob("snap-????????"):
        for p in sorted(snap.rglob("*"), reverse=True):
            p.rmdir() if p.is_dir() else p.unlink()
        snap.rmdir()
    with pytest.raises(RecoveryError, match="missing"):
        _recover(tmp_path)


# ---- defect 7: failed snapshots leave no tmp directories ---------------------------------------------

@pytest.mark.parametrize("fork", [False, True], ids=["sync", "fork"])
def test_d7_failed_snapshot_leaves_no_tmp_directory(tmp_path, fork):
    mem = _durable(tmp_path)
    mem.create(**SHAPE, seed=3)
    dur = mem.engine.durability
    dur.cfg.fork_snapshots = fork
    dur.cfg.fault_snapshot_failures = 1  # ENOSPC after the first bytes of the data file
    with pytest.raises(Internal, match="snapshot"):
        mem.snapshot()
    assert not list(tmp_path.glob("snap-*")), [p.name for p in tmp_path.iterdir()]
    assert mem.snapshot()["version"] == 0
    assert mem.close() is True


def test_d7_close_reports_a_failed_final_snapshot(tmp_path):
    mem = _durable(tmp_path)
    mem.create(**SHAPE, seed=3)
    mem.engine.durability.cfg.fault_snapshot_failures = 1
    assert mem.close() is False
    assert _durable(tmp_path).info()["capacity"] == 32  # the log still held everything


# ---- defect 8: recovery refuses clearly (exit 4, or 2 for the data dir itself) -------------------------

def _bad_update(version, slots, name="default", dk=16, dv=8):
    n = len(slots)
    keys = np.eye(n, dk, dtype=np.float32)
    return UpdateEffect(name, version, f"bad-{version}", np.array(slots, np.int64), keys, np.array(slots, np.int64),
                        np.full((n, dv), 1 / dv, np.float32), np.full(n, -1, np.int64), np.zeros(n, bool),
                        np.array(slots, np.int64))


@pytest.mark.parametrize("case", ["slot beyond capacity", "no such memory", "wrong key width", "version gap"])
def test_d8_unappliable_wal_record_refuses_to_start(tmp_path, case):
    _history(tmp_path, n_updates=1)
    effect = {
        "slot beyond capacity": _bad_update(2, [SHAPE["capacity"] + 3]),
        "no such memory": _bad_update(1, [0], name="ghost"),
        "wrong key width": PutEffect("default", 2, "w", np.array([0], np.int64), np.ones((1, 1), np.float32),
                                     np.full((1, 8), 0.125, np.float32), np.zeros(1, np.float32),
                                     np.full(1, -1, np.int64)),
        "version gap": _bad_update(5, [0]),
    }[case]
    _log_effects(tmp_path, [effect])
    with pytest.raises(RecoveryError, match="cannot be applied"):
        _recover(tmp_path)


def test_d8_cli_exit_codes_for_unusable_and_unrecoverable_data_dirs(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    assert cli.main(["--data-dir", str(a_file), "--backend", "faiss"]) == 2
    data = tmp_path / "data"
    _history(data, n_updates=1)
    _log_effects(data, [_bad_update(1, [0], name="ghost")])
    assert cli.main(["--data-dir", str(data), "--backend", "faiss", "--lock-timeout-s", "1"]) == 4


def test_d8_regular_file_named_like_a_tmp_snapshot_is_removed(tmp_path):
    live, _ = _history(tmp_path, n_updates=2)
    junk = tmp_path / "snap-00000009.tmp"
    junk.write_bytes(b"junk")
    _, store = _recover(tmp_path)
    assert not junk.exists() and store.memories["default"].version == 2


@pytest.mark.parametrize("text", ["[]", "{}", '{"format": 2}', "null"])
def test_d8_malformed_manifest_refuses_to_start(tmp_path, text):
    _history(tmp_path, n_updates=2, snapshot_after=0)
    manifest = next(tmp_path.glob("snap-????????")) / "manifest.json"
    manifest.write_text(text)
    with pytest.raises(RecoveryError, match="manifest"):
        _recover(tmp_path)


# ---- defect 9: argument bounds ------------------------------------------------------------------

def test_d9_age_noise_and_threshold_are_bounded():
    mem = InProcessMemory(**SHAPE, seed=1, backend="faiss")
    q, v = np.ones((1, 16), np.float32), np.ones((1, 8), np.float32)
    for kw in ({"age_noise": 1e308}, {"age_noise": 1e6 + 1}, {"threshold": 1e7}):
        with pytest.raises(BadValue, match="1e\\+06"):
            mem.update(q, v, **{"threshold": 0.5, **kw})
    assert mem.info()["version"] == 0
    assert mem.update(q, v, threshold=1e6, age_noise=1e6, seed=1)["version"] == 1


# ---- defect 10: the client refuses floats where ints are meant --------------------------------------

def test_d10_client_refuses_float_slots_and_item_ids():
    mem = InProcessMemory(**SHAPE, seed=1, backend="faiss")
    with pytest.raises(BadDtype, match="slots"):
        mem.get([1.5])
    with pytest.raises(BadDtype, match="item_ids"):
        mem.update(np.ones((1, 16)), np.ones((1, 8)), threshold=0.1, item_ids=[3.7])
    with pytest.raises(BadDtype, match="slots"):
        mem.put(np.array([2.0]), np.ones((1, 16)), np.ones((1, 8)))
    assert mem.info()["version"] == 0
    assert mem.get(np.array([1], np.uint8))["item_ids"].tolist() == [-1]  # any integer dtype is fine


# ---- defect 11: error messages render a bounded prefix of a value -----------------------------------

class _Spy:
    rendered = 0

    def __repr__(self) -> str:
        _Spy.rendered += 1
        return "spy"


def test_d11_messages_render_a_bounded_prefix():
    mem = InProcessMemory(**SHAPE, seed=1, backend="faiss")
    _Spy.rendered = 0
    huge = [_Spy() for _ in range(100_000)]
    with pytest.raises(BadRequest) as info:
        mem._result("query", {"k": huge}, [("q", np.ones((1, 16), np.float32))])
    assert len(str(info.value)) < 300
    assert _Spy.rendered <= 10, f"{_Spy.rendered} elements rendered to build one error message"


def test_d5_idempotency_windows_shrink_instead_of_passing_max_memory_bytes(tmp_path):
    mem = _durable(tmp_path, mode="batch", max_memory_bytes=80 * 1024)  # one 64 KiB memory + ~16 KiB of windows
    mem.create(8, 4, 3, seed=1)
    q, v = np.eye(4, dtype=np.float32)[:2], np.ones((2, 3), np.float32)
    for i in range(60):
        assert mem.update(q, v, threshold=0.0, request_id=f"r{i}")["version"] == i + 1  # never refused
    stats = mem.stats()
    window = mem.store.memories["default"].window
    assert stats["window_evictions"] > 0 and stats["memory_bytes"] <= 80 * 1024
    assert "r59" in window and "r0" not in window
    mem.close()
    back = _durable(tmp_path, mode="batch", max_memory_bytes=80 * 1024)  # replay sheds the same entries
    assert list(back.store.memories["default"].window) == list(window)


@pytest.mark.parametrize("flags", [["--max-queue-bytes", "10"], ["--max-memories", "0"], ["--max-send-bytes", "-1"],
                                   ["--capacity", "4"]])
def test_bad_limit_flags_exit_2(flags):
    assert cli.main(["--durability", "none", "--max-message-bytes", "100", *flags]) == 2

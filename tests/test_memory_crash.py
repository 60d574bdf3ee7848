"""Crash safety of the real server: kill -9 mid-stream (also mid-snapshot) loses no acknowledged
update, a torn final WAL record is ignored, SIGTERM snapshots and exits 0, idempotency and clients
survive restarts (F1, F2, M7)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq
from memserver_helpers import UpdateStream, assert_same_state, free_port, header_bytes, running_server

from memory_server.client import MemoryClient, MemoryUnavailable
from memory_server.launcher import ServerStartError
from memory_server.local import InProcessMemory
from memory_server.wal import SEGMENT_HEADER_BYTES

pytestmark = pytest.mark.integration

SHAPE = {"capacity": 48, "key_dim": 16, "value_dim": 8}
SEED = ["--seed", "21"]


class Streamer(threading.Thread):
    """Sends updates until the server stops answering; records what was sent and acknowledged."""

    def __init__(self, endpoint: str, n_ready: int, seed: int, timeout_ms: int = 1000, retries: int = 0,
                 limit: int = 10_000) -> None:
        super().__init__(daemon=True)
        self.client = MemoryClient(endpoint, timeout_ms=timeout_ms, retries=retries)
        self.stream = UpdateStream(16, 8, seed=seed)
        self.sent: list[dict] = []
        self.acked: list[dict] = []
        self.ready = threading.Event()
        self.n_ready, self.limit = n_ready, limit
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while len(self.acked) < self.limit:
                kw = self.stream.next()
                self.sent.append(kw)
                self.acked.append(self.client.update(**kw))
                if len(self.acked) >= self.n_ready:
                    self.ready.set()
        except MemoryUnavailable:
            pass
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc
        finally:
            self.ready.set()
            self.client.close()


def _reference(payloads: list[dict]) -> tuple[InProcessMemory, list[dict]]:
    ref = InProcessMemory(capacity=48, key_dim=16, value_dim=8, seed=21, backend="faiss")
    return ref, [ref.update(**kw) for kw in payloads]


def _check_recovered(endpoint: str, s: Streamer) -> None:
    with MemoryClient(endpoint, timeout_ms=20_000) as c:
        got = c.export()
    n_ack = len(s.acked)
    # The request in flight at the kill may or may not have been logged; nothing acknowledged may be missing.
    assert got["version"] in (n_ack, n_ack + 1) and got["version"] <= len(s.sent), (got["version"], n_ack)
    ref, replies = _reference(s.sent[: got["version"]])
    for mine, theirs in zip(s.acked, replies, strict=False):  # replies may hold the in-flight one
        assert mine["version"] == theirs["version"]
        np.testing.assert_array_equal(mine["slots"], theirs["slots"])
        np.testing.assert_array_equal(mine["hit"], theirs["hit"])
    assert_same_state(got, ref.export())


@pytest.mark.parametrize("trial,extra,n_ready", [
    ("fork-snapshots", ["--snapshot-wal-bytes", "5000"], 25),
    ("sync-snapshots", ["--snapshot-wal-bytes", "5000", "--snapshot-mode", "sync"], 17),
    ("wal-only", [], 9),
])
def test_kill9_mid_stream_loses_no_acknowledged_update(tmp_path, trial, extra, n_ready):
    data = tmp_path / "data"
    with running_server(data, **SHAPE, extra_args=SEED + extra) as srv:
        s = Streamer(srv.endpoint, n_ready, seed=len(trial))
        s.start()
        assert s.ready.wait(120)
        srv.kill()
        s.join(30)
    assert s.error is None and not s.is_alive()
    if trial != "wal-only":
        assert list(data.glob("snap-*")), "periodic snapshots should have run during the stream"
    with running_server(data, extra_args=SEED) as srv2:
        _check_recovered(srv2.endpoint, s)
        assert srv2.stop() == 0


def test_kill9_during_a_snapshot(tmp_path):
    data = tmp_path / "data"
    # The fault hook holds every snapshot open for 60 s between writing its files and the rename.
    with running_server(data, **SHAPE, extra_args=SEED + ["--fault-snapshot-pause-s", "60"]) as srv:
        s = Streamer(srv.endpoint, 6, seed=3)
        s.start()
        assert s.ready.wait(120)
        snapper = zmq.Context.instance().socket(zmq.DEALER)  # fire the snapshot op; its reply never comes
        snapper.setsockopt(zmq.LINGER, 0)
        snapper.connect(srv.endpoint)
        snapper.send_multipart([header_bytes(v=1, op="snapshot", id="snap")])
        deadline = time.monotonic() + 60
        while not list(data.glob("snap-*.tmp/manifest.json")):  # the snapshot's files are written
            assert time.monotonic() < deadline, "snapshot never started"
            time.sleep(0.02)
        n_before = len(s.acked)
        while len(s.acked) < n_before + 3:  # serving continues while the child writes
            assert time.monotonic() < deadline and s.is_alive(), "updates stalled during the snapshot"
            time.sleep(0.01)
        srv.kill()
        s.join(30)
        snapper.close(0)
    assert not list(data.glob("snap-????????")), "the interrupted snapshot must not look complete"
    with running_server(data, extra_args=SEED) as srv2:  # also proves the snapshot child released the lock
        _check_recovered(srv2.endpoint, s)
        assert not list(data.glob("snap-*.tmp"))
        assert srv2.stop() == 0


def test_torn_final_wal_record_is_ignored(tmp_path):
    data = tmp_path / "data"
    with running_server(data, **SHAPE, extra_args=SEED) as srv:
        s = Streamer(srv.endpoint, 5, seed=8, limit=5)
        s.run()
        srv.kill()
    assert len(s.acked) == 5
    seg = sorted(data.glob("wal-*.log"))[-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(size - 100)  # the last update record loses its tail, as if the machine died mid-write
    with running_server(data, extra_args=SEED) as srv2:
        with MemoryClient(srv2.endpoint, timeout_ms=20_000) as c:
            got = c.export()
        assert got["version"] == 4
        ref, _ = _reference(s.sent[:4])
        assert_same_state(got, ref.export())
        assert srv2.stop() == 0
    assert "torn final WAL record" in srv2.log_tail()


def test_sigterm_snapshots_and_exits_zero(tmp_path):
    data = tmp_path / "data"
    with running_server(data, **SHAPE, extra_args=SEED) as srv:
        s = Streamer(srv.endpoint, 4, seed=9, limit=4)
        s.run()
        assert srv.stop() == 0
    snaps = sorted(data.glob("snap-*"))
    assert len(snaps) == 1 and '"version": 4' in (snaps[0] / "manifest.json").read_text()
    assert all(p.stat().st_size == SEGMENT_HEADER_BYTES for p in data.glob("wal-*.log")), \
        "the snapshot must cover the whole log"
    with running_server(data, extra_args=SEED) as srv2:
        with MemoryClient(srv2.endpoint, timeout_ms=20_000) as c:
            ref, _ = _reference(s.sent)
            assert_same_state(c.export(), ref.export())
        assert srv2.stop() == 0
    assert "0 log records replayed" in srv2.log_tail()


def test_idempotency_survives_restart(tmp_path):
    data = tmp_path / "data"
    q = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    with running_server(data, **SHAPE, extra_args=SEED) as srv:
        with MemoryClient(srv.endpoint, timeout_ms=20_000) as c:
            first = c.update(q, np.ones((3, 8)), threshold=0.1, request_id="run1-rank0-step7")
            c.put([1], q[:1], np.ones((1, 8)), request_id=77)
        srv.kill()
    with running_server(data, extra_args=SEED) as srv2:
        with MemoryClient(srv2.endpoint, timeout_ms=20_000) as c:
            again = c.update(-q, np.ones((3, 8)) * 3, threshold=9.0, request_id="run1-rank0-step7")
            assert again["version"] == first["version"] == 1
            np.testing.assert_array_equal(again["slots"], first["slots"])
            np.testing.assert_array_equal(again["hit"], first["hit"])
            assert c.put([2], q[:1], np.ones((1, 8)), request_id=77)["version"] == 2
            assert c.info()["version"] == 2
        assert srv2.stop() == 0


def test_client_survives_server_restart_mid_stream(tmp_path):
    data = tmp_path / "data"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with running_server(data, bind=endpoint, **SHAPE, extra_args=SEED) as srv:
        s = Streamer(srv.endpoint, 8, seed=11, timeout_ms=1000, retries=60, limit=24)
        s.start()
        assert s.ready.wait(120)
        srv.kill()
    with running_server(data, bind=endpoint, extra_args=SEED) as srv2:
        s.join(120)
        assert s.error is None and not s.is_alive()
        assert [r["version"] for r in s.acked] == list(range(1, 25)), "a retry was lost or applied twice"
        _check_recovered(srv2.endpoint, s)
        assert srv2.stop() == 0


def test_corrupt_log_refuses_to_start(tmp_path):
    data = tmp_path / "data"
    with running_server(data, **SHAPE, extra_args=SEED) as srv:
        s = Streamer(srv.endpoint, 4, seed=12, limit=4)
        s.run()
        srv.kill()
    seg = sorted(data.glob("wal-*.log"))[-1]
    raw = bytearray(seg.read_bytes())
    raw[len(raw) // 3] ^= 0x55
    seg.write_bytes(bytes(raw))
    with pytest.raises(ServerStartError, match="exited with code 4"):
        with running_server(data, extra_args=SEED):
            pass

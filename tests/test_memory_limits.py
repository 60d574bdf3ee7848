"""Issue 10's defects and PROTOCOL.md's limits against a real server process on loopback: a request
that used to end the process, replies and queues bounded in bytes, memory accounting against the
server's RSS, failed snapshots, the exit code of a failed final snapshot, a retried drop.

Each test failed on the code before the fix (the number of the issue's defect is in its name).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import msgpack
import numpy as np
import psutil
import pytest
import zmq
from memserver_helpers import header_bytes, raw_request, running_server, scrape_metrics

from memory_server.client import MemoryClient
from memory_server.protocol import Internal, TooLarge

pytestmark = pytest.mark.integration

MIB = 1 << 20


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _wait_for(cond, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A server with a 1 MiB message limit and a 2048-slot memory (export 0.8 MB, fits)."""
    args = ["--max-message-bytes", str(MIB), "--seed", "5", "--metrics-port", "0"]
    with running_server(None, durability="none", capacity=2048, key_dim=64, value_dim=32, extra_args=args) as srv:
        yield srv
        assert srv.stop() == 0


def test_d1_zero_byte_frame_with_huge_shape_gets_bad_shape(small):
    # The 40-byte request that ended the process: a 0-byte frame passes the size check, then numpy
    # refused to build an empty array whose other dimension overflows.
    frames = [msgpack.packb({"v": 1, "op": "get", "id": 7, "arrays": [["slots", "int64", [0, 4611686018427387904]]]}),
              b""]
    reply, _ = raw_request(small.endpoint, frames)
    assert (reply["ok"], reply["id"], reply["error"]["code"]) == (False, 7, "bad_shape")
    for shape in ([0, 2**31 - 1, 2**31 - 1], [2**31], [-1], [1] * 9):
        reply, _ = raw_request(small.endpoint, [header_bytes(v=1, op="get", id=8, arrays=[["slots", "int64", shape]]),
                                                b""])
        assert reply["error"]["code"] == "bad_shape", (shape, reply)
    assert raw_request(small.endpoint, [header_bytes(v=1, op="ping", id=1)])[0]["ok"] is True
    assert small.poll() is None


def test_d5_request_ids_are_bounded_on_the_wire(small):
    for bad in ("x" * 257, 2**64 - 1, ["a"] * 10_000):
        reply, _ = raw_request(small.endpoint, [header_bytes(v=1, op="ping", id=bad)])
        assert reply["error"]["code"] == "bad_request" and reply["id"] is None
    reply, _ = raw_request(small.endpoint, [header_bytes(v=1, op="ping", id="y" * 256)])
    assert reply["ok"] and reply["id"] == "y" * 256


def test_d5_reply_over_the_message_limit_is_refused_before_it_is_built(small):
    with MemoryClient(small.endpoint, timeout_ms=30_000) as c:
        q = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
        with pytest.raises(TooLarge, match=r"reply would be \d+ bytes"):
            c.query(q, 2048, fields=("keys", "values"))  # 4 x 2048 x 396 bytes = 3.2 MB
        assert c.query(q, 16, fields=("keys",))["keys"].shape == (4, 16, 64)
        assert c.export()["keys"].shape == (2048, 64)  # 0.8 MB: fits
        c.create(4096, 64, 32, seed=2, memory="big")  # its export would be 1.6 MB
        with pytest.raises(TooLarge, match="export reply"):
            c._result("export", memory="big")
        whole = c.export(memory="big")  # the client reads it in chunks at one version instead
        assert whole["keys"].shape == (4096, 64) and whole["version"] == 0
        np.testing.assert_array_equal(whole["values"][4000:], c.get(np.arange(4000, 4096), memory="big")["values"])
        c.drop(memory="big")


def test_d5_oversize_multiframe_request_is_refused_at_admission(small):
    frames = [header_bytes(v=1, op="ping", id=42)] + [b"z" * (400 * 1024)] * 3  # each fits, together not
    reply, _ = raw_request(small.endpoint, frames)
    assert reply["error"]["code"] == "too_large" and reply["id"] == 42


def test_limit_refusals_are_counted_by_limit(small):
    with MemoryClient(small.endpoint, timeout_ms=30_000) as c:
        metrics = scrape_metrics(c.info()["metrics_port"])
    for limit in ("shape", "id", "reply_bytes", "message_bytes"):
        assert metrics.get(f'memsrv_limit_refusals_total{{limit="{limit}"}}', 0) >= 1, limit
    assert metrics["memsrv_memories"] >= 1 and metrics["memsrv_memory_bytes_total"] > 2048 * 64 * 4


def test_d5_queued_requests_are_bounded_in_bytes(tmp_path):
    args = ["--max-message-bytes", str(64 * 1024), "--max-queue-bytes", str(128 * 1024), "--snapshot-mode", "sync",
            "--fault-snapshot-pause-s", "1.5"]
    with running_server(tmp_path / "data", capacity=8, key_dim=4, value_dim=3, extra_args=args) as srv:
        ctx = zmq.Context.instance()
        socks = [ctx.socket(zmq.DEALER) for _ in range(2)]
        try:
            for s in socks:
                s.setsockopt(zmq.LINGER, 0)
                s.connect(srv.endpoint)
            socks[0].send_multipart([header_bytes(v=1, op="snapshot", id="snap")])  # holds the loop 1.5 s
            _wait_for(lambda: list((tmp_path / "data").glob("snap-*.tmp/manifest.json")), "the snapshot to start")
            pad = ["pad", "uint8", [60 * 1024]]
            for i in range(8):  # 8 x 60 KiB arrive while the loop is busy; 128 KiB of them may queue
                socks[1].send_multipart([header_bytes(v=1, op="ping", id=i, arrays=[pad]), b"\0" * (60 * 1024)])
            codes = []
            for _ in range(8):
                assert socks[1].poll(60_000)
                codes.append(msgpack.unpackb(socks[1].recv_multipart()[0])["error"]["code"])
            assert sorted(codes) == ["bad_request"] * 2 + ["busy"] * 6  # admitted ones reach the op check
            assert socks[0].poll(60_000) and msgpack.unpackb(socks[0].recv_multipart()[0])["ok"] is True
        finally:
            for s in socks:
                s.close(0)
        assert srv.stop() == 0


def test_d5_a_client_that_never_reads_is_bounded_in_bytes():
    args = ["--max-message-bytes", str(MIB)]  # --max-send-bytes: 4 MiB
    with running_server(None, durability="none", capacity=4096, key_dim=64, value_dim=8, extra_args=args) as srv, \
            MemoryClient(srv.endpoint, timeout_ms=60_000) as good:
        q = np.random.default_rng(1).standard_normal((1, 64)).astype(np.float32)
        good.query(q, 1024, fields=("keys",))  # warm up: first search buffers, reply path
        before = _rss(srv.pid)
        slow = zmq.Context.instance().socket(zmq.DEALER)
        slow.setsockopt(zmq.LINGER, 0)
        slow.setsockopt(zmq.RCVHWM, 1)
        slow.setsockopt(zmq.RCVBUF, 4096)  # a client that stops reading: the kernel buffers fill at once
        slow.connect(srv.endpoint)
        try:
            head = header_bytes(v=1, op="query", id=0, args={"k": 1024, "fields": ["keys"]},
                                arrays=[["q", "float32", [1, 64]]])
            n = 0
            for _ in range(15):  # 300 replies of 270 KB: 80 MB if the server kept them all
                for _ in range(20):  # in steps below --max-queue, so the queue itself refuses none
                    slow.send_multipart([head, q.tobytes()])
                n += 20
                _wait_for(lambda n=n: good.stats()["requests"].get("query", 0) >= n + 1, "the server to answer them")
            grown = _rss(srv.pid) - before
            stats = good.stats()
            assert grown < 32 * MIB, f"the server grew by {grown / MIB:.0f} MiB for a client that does not read"
            assert stats["errors"].get("busy", 0) > 0
            assert good.ping()["time"] > 0  # other clients are served meanwhile
            assert slow.poll(30_000), "the slow client gets its first replies once it reads"
        finally:
            slow.close(0)
        assert srv.stop() == 0


def test_d2_create_is_accounted_by_what_the_server_really_holds():
    args = ["--max-memory-bytes", str(80 * MIB)]
    with running_server(None, durability="none", extra_args=args) as srv, \
            MemoryClient(srv.endpoint, timeout_ms=60_000) as c:
        rng = np.random.default_rng(0)
        c.create(64, 8, 4, seed=0, memory="warm")  # first search: faiss and BLAS buffers
        c.update(rng.standard_normal((4, 8)), rng.random((4, 4)) + 0.1, threshold=0.0, age_noise=1.0, seed=1,
                 memory="warm")
        before = _rss(srv.pid)
        with pytest.raises(TooLarge, match="max-memory-bytes"):
            c.create(1_000_000, 8, 4, memory="big")  # 60 B/slot of protocol arrays, 97 B/slot held
        c.create(600_000, 8, 4, seed=1, memory="fits")
        # An update with misses and noise touches every page: ages, the scratch arrays.
        c.update(rng.standard_normal((4, 8)), rng.random((4, 4)) + 0.1, threshold=0.0, age_noise=1.0, seed=1,
                 memory="fits")
        grown = _rss(srv.pid) - before
        nbytes = c.info(memory="fits")["nbytes"]
        assert abs(grown - nbytes) <= 0.1 * nbytes + 4 * MIB, (grown, nbytes)
        assert c.stats()["memory_bytes"] <= 80 * MIB
        assert srv.stop() == 0


def test_d4_failed_forks_are_counted_retried_and_never_fail_a_drop(tmp_path):
    args = ["--fault-fork-fail", "2", "--metrics-port", "0"]
    with running_server(tmp_path / "data", capacity=8, key_dim=4, value_dim=3, extra_args=args) as srv, \
            MemoryClient(srv.endpoint, timeout_ms=30_000) as c:
        c.create(4, 4, 3, seed=1, memory="gone")
        assert c.drop(memory="gone") == {}  # its snapshot's fork fails (1)
        with pytest.raises(Internal, match="fork"):
            c.snapshot()  # (2)
        assert c.snapshot()["version"] == 0  # retried: durable
        assert c.stats()["snapshot_failures"] == 2
        assert scrape_metrics(c.info()["metrics_port"])["memsrv_snapshot_failures_total"] == 2
        assert not list((tmp_path / "data").glob("snap-*.tmp"))
        assert srv.stop() == 0


def test_d7_sigterm_whose_final_snapshot_fails_exits_1_and_says_so(tmp_path):
    data = tmp_path / "data"
    with running_server(data, capacity=8, key_dim=4, value_dim=3,
                        extra_args=["--seed", "1", "--fault-snapshot-fail", "1"]) as srv:
        with MemoryClient(srv.endpoint, timeout_ms=30_000) as c:
            c.update(np.eye(4)[:2], np.ones((2, 3)), threshold=0.0)
        assert srv.stop() == 1
        assert "final snapshot failed" in srv.log_tail()
    assert not list(data.glob("snap-*"))
    with running_server(data) as srv2, MemoryClient(srv2.endpoint, timeout_ms=30_000) as c:
        assert c.info()["version"] == 1  # the log held the acknowledged update
        assert srv2.stop() == 0


def test_d10_a_retried_drop_whose_first_reply_was_lost_succeeds():
    with running_server(None, durability="none") as srv, \
            MemoryClient(srv.endpoint, timeout_ms=300, retries=40) as c:
        c.create(4, 4, 3, seed=1, memory="x")
        out: list = []

        def drop() -> None:
            try:
                out.append(c.drop(memory="x"))
            except Exception as exc:  # noqa: BLE001 - surfaced below
                out.append(exc)

        os.kill(srv.pid, signal.SIGSTOP)  # the first attempt's reply will go to a socket the client closed
        try:
            t = threading.Thread(target=drop)
            t.start()
            _wait_for(lambda: c.timeouts >= 2, "the client to resend the drop")
        finally:
            os.kill(srv.pid, signal.SIGCONT)
        t.join(60)
        assert out == [{}], out
        with MemoryClient(srv.endpoint, timeout_ms=30_000) as c2:
            assert "x" not in c2.info()["memories"]
        assert srv.stop() == 0


def test_client_refuses_a_request_id_the_server_could_not_echo(small):
    # The server answers such a request with id null, which the client could never match: it used to
    # wait through every retry and raise MemoryUnavailable. Now it is refused before anything is sent.
    from memory_server.protocol import BadRequest

    q = np.ones((1, 64), np.float32)
    v = np.full((1, 32), 1 / 32, np.float32)
    with MemoryClient(small.endpoint, timeout_ms=60_000, retries=3) as mem:
        for bad in ("x" * 257, 2**63, 1.5):
            with pytest.raises(BadRequest, match="request_id"):
                mem.update(q, v, threshold=0.0, request_id=bad)
        assert mem.timeouts == 0  # refused locally, never sent and waited for
        assert mem.update(q, v, threshold=0.0, request_id="y" * 256)["hit"].shape == (1,)

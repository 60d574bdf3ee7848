"""Every op and every error code through a real `python -m memory_server` process and MemoryClient."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq
from memserver_helpers import header_bytes, initial_state, raw_request, running_server, unit

from memory_server.client import MemoryClient
from memory_server.protocol import (
    BadDtype,
    BadRequest,
    BadShape,
    BadValue,
    Exists,
    Internal,
    NoSuchMemory,
    TooLarge,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("ops")
    with running_server(d / "data", capacity=32, key_dim=8, value_dim=5,
                        extra_args=["--seed", "7", "--max-batch", "64", "--fault-internal-op", "stats"]) as srv:
        yield srv
        assert srv.stop() == 0


@pytest.fixture
def client(server):
    with MemoryClient(server.endpoint, timeout_ms=20_000, retries=1) as c:
        yield c


def test_ping_and_info(client):
    before = time.time()
    assert client.ping()["time"] >= before - 5
    info = client.info()
    assert info["protocol"] == 1 and info["server"].startswith("pccnet-memory-server")
    assert "default" in info["memories"]
    assert (info["capacity"], info["key_dim"], info["value_dim"]) == (32, 8, 5)
    assert info["backend"] == "faiss-cpu" and info["durability"] == "always"
    assert "capacity" not in client.info(memory="absent")


def test_create_drop_and_memory_scoping(client):
    assert client.create(10, 4, 3, seed=1, memory="tmp")["version"] == 0
    assert client.create(10, 4, 3, memory="tmp")["version"] == 0  # idempotent
    with pytest.raises(Exists, match="capacity=10"):
        client.create(11, 4, 3, memory="tmp")
    np.testing.assert_array_equal(client.export(memory="tmp")["keys"], initial_state(10, 4, 3, 1)["keys"])
    assert "tmp" in client.info()["memories"]
    client.drop(memory="tmp")
    assert "tmp" not in client.info()["memories"]
    with pytest.raises(NoSuchMemory, match="'tmp'"):
        client.drop(memory="tmp")
    with pytest.raises(NoSuchMemory):
        client.query(np.ones((1, 4)), 1, memory="tmp")


def test_default_memory_from_flags_has_seeded_keys(client):
    ex = client.export(memory="default")
    assert ex["version"] == 0  # no test in this module changes 'default' (they only send bad requests)
    np.testing.assert_array_equal(ex["keys"], initial_state(32, 8, 5, 7)["keys"])
    assert ex["keys"].shape == (32, 8) and ex["item_ids"].dtype == np.int64


def test_query_update_get_put_export_snapshot_stats(client):
    client.create(16, 8, 5, seed=3, memory="flow")
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    v = rng.random((4, 5)).astype(np.float32)
    r = client.query(q, 3, targets=v, fields=["values", "item_ids"], memory="flow")
    assert set(r) == {"slots", "sims", "values", "item_ids", "kl", "version"}
    assert r["slots"].shape == (4, 3) and r["sims"].dtype == np.float32 and r["kl"].shape == (4, 3)
    assert (np.diff(r["sims"], axis=1) <= 0).all()
    u = client.update(q, v, threshold=0.0, item_ids=np.arange(4) + 50, memory="flow")
    assert u["version"] == 1 and not u["hit"].any() and u["hit"].dtype == bool
    np.testing.assert_array_equal(u["slots"], [0, 1, 2, 3])
    g = client.get(u["slots"], memory="flow")
    np.testing.assert_allclose(g["keys"], unit(q), atol=1e-7)
    np.testing.assert_array_equal(g["item_ids"], [50, 51, 52, 53])
    np.testing.assert_array_equal(g["ages"], 0)
    assert client.put([5], [[1] * 8], [[1] * 5], ages=[2.5], item_ids=[9], memory="flow")["version"] == 2
    ex = client.export(memory="flow")
    assert ex["version"] == 2 and ex["ages"][5] == 2.5 and ex["item_ids"][5] == 9
    assert client.snapshot(memory="flow")["version"] == 2
    hit = client.update(q[:1], v[:1], threshold=50.0, memory="flow")
    assert hit["hit"][0] and hit["slots"][0] == 0
    with pytest.raises(Internal, match="injected fault"):
        client.stats()  # --fault-internal-op stats: a bug becomes `internal`, the server keeps serving
    assert client.ping()["time"] > 0


def test_error_codes_through_the_client(client):
    q = np.ones((2, 8), np.float32)
    v = np.ones((2, 5), np.float32)
    cases = [
        (BadValue, lambda: client.query(q, 0)),
        (BadValue, lambda: client.query(q, 33)),
        (BadValue, lambda: client.query(q, 1, fields=["nope"])),
        (BadShape, lambda: client.query(np.ones((2, 9), np.float32), 1)),
        (BadDtype, lambda: client._result("get", None, [("slots", np.zeros(1, np.int32))])),
        (BadValue, lambda: client.update(q, v, threshold=-1.0)),
        (BadValue, lambda: client.update(q, -v, threshold=0.0)),
        (TooLarge, lambda: client.query(np.ones((65, 8), np.float32), 1)),
        (TooLarge, lambda: client.update(np.ones((33, 8), np.float32), np.ones((33, 5)), threshold=0.0)),
        (BadValue, lambda: client.put([1, 1], np.ones((2, 8)), np.ones((2, 5)))),
        (BadValue, lambda: client.get([32])),
        (BadValue, lambda: client.create(0, 4, 3, memory="zero")),
        (BadValue, lambda: client.info(memory="../x")),
        (BadRequest, lambda: client._result("create", {"capacity": "10", "key_dim": 4, "value_dim": 3})),
    ]
    before = client.export()
    for exc, call in cases:
        with pytest.raises(exc):
            call()
    after = client.export()
    assert after["version"] == before["version"]
    np.testing.assert_array_equal(after["keys"], before["keys"])


def test_unknown_op_and_version_via_raw_socket(server):
    reply, _ = raw_request(server.endpoint, [header_bytes(v=1, op="frobnicate", id=3)])
    assert reply["error"]["code"] == "unknown_op" and reply["id"] == 3 and reply["ok"] is False
    reply, _ = raw_request(server.endpoint, [header_bytes(v=2, op="ping", id="x")])
    assert reply["error"]["code"] == "unsupported_version" and reply["id"] == "x"


def test_req_socket_with_empty_delimiter(server):
    reply, _ = raw_request(server.endpoint, [header_bytes(v=1, op="ping", id=1)], socket_type=zmq.REQ)
    assert reply["ok"] is True and reply["id"] == 1 and "time" in reply["result"]
    reply, _ = raw_request(server.endpoint, [b"", header_bytes(v=1, op="ping", id=2)])
    assert reply["ok"] is True and reply["id"] == 2


def test_float16_and_wire_ids(server, client):
    r = client.query(np.ones((1, 8), np.float16), 2)
    assert r["slots"].shape == (1, 2)
    reply, frames = raw_request(server.endpoint, [header_bytes(v=1, op="get", id=9, arrays=[["slots", "int64", [1]]]),
                                                  np.array([0], np.int64).tobytes()])
    assert reply["ok"] and [a[0] for a in reply["arrays"]] == ["keys", "values", "ages", "item_ids"]
    assert len(frames) == 4 and len(frames[0]) == 8 * 4

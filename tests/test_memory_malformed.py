"""Malformed requests from a raw pyzmq DEALER (not our client): each gets the right error, the server
keeps answering ping, and no memory changes (F14)."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq
from memserver_helpers import header_bytes, raw_request, running_server

pytestmark = pytest.mark.integration

M, DK, DV = 32, 16, 8
MAX_MSG = 64 * 1024


def _f32(*shape, fill=1.0):
    return np.full(shape, fill, np.float32)


def _req(op, arrays=(), **fields):
    """Frames of a request with arrays [(name, dtype, shape, bytes)]."""
    head = {"v": 1, "op": op, "id": 42, **fields}
    if arrays:
        head["arrays"] = [[n, d, s] for n, d, s, _ in arrays]
    return [header_bytes(**head), *[b for *_, b in arrays]]


def _q(a):
    return ("q", "float32", list(a.shape), a.tobytes())


def _v(a):
    return ("v", "float32", list(a.shape), a.tobytes())


UPD = {"args": {"threshold": 0.5}}
GOOD_V = _v(_f32(2, DV))
GOOD_Q = _q(_f32(2, DK))
nan_q = _f32(2, DK)
nan_q[1, 3] = np.nan
inf_v = _f32(2, DV)
inf_v[0, 0] = np.inf
zero_q = _f32(2, DK)
zero_q[1] = 0
neg_v = _f32(2, DV)
neg_v[1, 2] = -0.1
zero_v = _f32(2, DV)
zero_v[0] = 0

CASES = {
    "not msgpack": ([b"\xc1\xc1"], "bad_request", None),
    "msgpack non-map": ([msgpack.packb([1, 2, 3])], "bad_request", None),
    "missing v": ([header_bytes(op="ping", id=42)], "bad_request", 42),
    "missing op": ([header_bytes(v=1, id=42)], "bad_request", 42),
    "missing id": ([header_bytes(v=1, op="ping")], "bad_request", None),
    "id float": ([header_bytes(v=1, op="ping", id=1.5)], "bad_request", None),
    "id bool": ([header_bytes(v=1, op="ping", id=True)], "bad_request", None),
    "v as str": ([header_bytes(v="1", op="ping", id=42)], "bad_request", 42),
    "op as int": ([header_bytes(v=1, op=5, id=42)], "bad_request", 42),
    "unknown op": (_req("explode"), "unknown_op", 42),
    "bad version": ([header_bytes(v=9, op="ping", id=42)], "unsupported_version", 42),
    "bad dtype string": (_req("query", [("q", "float64", [2, DK], b"\0" * 2 * DK * 8)], args={"k": 1}),
                         "bad_dtype", 42),
    "dtype not taken by op": (_req("query", [("q", "int64", [2, DK], b"\0" * 2 * DK * 8)], args={"k": 1}),
                              "bad_dtype", 42),
    "shape/byte mismatch": (_req("query", [("q", "float32", [2, DK], b"\0" * 10)], args={"k": 1}), "bad_request", 42),
    "too few frames": ([header_bytes(v=1, op="query", id=42, args={"k": 1}, arrays=[["q", "float32", [2, DK]]])],
                       "bad_request", 42),
    "too many frames": (_req("query", [GOOD_Q], args={"k": 1}) + [b"extra"], "bad_request", 42),
    "arrays not a list": ([header_bytes(v=1, op="query", id=42, args={"k": 1}, arrays="q")], "bad_request", 42),
    "array spec not a triple": ([header_bytes(v=1, op="get", id=42, arrays=[["slots", "int64"]]), b"\0" * 8],
                                "bad_request", 42),
    "huge shape": ([header_bytes(v=1, op="get", id=42, arrays=[["slots", "int64", [2**40, 2**40]]]), b""],
                   "bad_shape", 42),
    "args not a map": (_req("query", [GOOD_Q], args=[1]), "bad_request", 42),
    "unknown arg": (_req("query", [GOOD_Q], args={"k": 1, "kk": 2}), "bad_request", 42),
    "unexpected array": (_req("query", [GOOD_Q, ("z", "uint8", [1], b"\0")], args={"k": 1}), "bad_request", 42),
    "missing required array": (_req("update", [GOOD_Q], **UPD), "bad_request", 42),
    "q wrong dim": (_req("query", [_q(_f32(2, DK + 1))], args={"k": 1}), "bad_shape", 42),
    "q one-dimensional": (_req("query", [_q(_f32(DK))], args={"k": 1}), "bad_shape", 42),
    "v rows differ from q": (_req("update", [GOOD_Q, _v(_f32(3, DV))], **UPD), "bad_shape", 42),
    "NaN query": (_req("query", [_q(nan_q)], args={"k": 1}), "bad_value", 42),
    "Inf value": (_req("update", [GOOD_Q, _v(inf_v)], **UPD), "bad_value", 42),
    "zero-norm query row": (_req("query", [_q(zero_q)], args={"k": 1}), "bad_value", 42),
    "negative value": (_req("update", [GOOD_Q, _v(neg_v)], **UPD), "bad_value", 42),
    "all-zero value row": (_req("update", [GOOD_Q, _v(zero_v)], **UPD), "bad_value", 42),
    "k = 0": (_req("query", [GOOD_Q], args={"k": 0}), "bad_value", 42),
    "k > capacity": (_req("query", [GOOD_Q], args={"k": M + 1}), "bad_value", 42),
    "k as float": (_req("query", [GOOD_Q], args={"k": 1.0}), "bad_request", 42),
    "duplicate put slots": (_req("put", [("slots", "int64", [2], np.array([3, 3], np.int64).tobytes()),
                                         ("keys", "float32", [2, DK], _f32(2, DK).tobytes()),
                                         ("values", "float32", [2, DV], _f32(2, DV).tobytes())]), "bad_value", 42),
    "slot out of range": (_req("get", [("slots", "int64", [1], np.array([M], np.int64).tobytes())]), "bad_value", 42),
    "negative slot": (_req("get", [("slots", "int64", [1], np.array([-1], np.int64).tobytes())]), "bad_value", 42),
    "negative threshold": (_req("update", [GOOD_Q, GOOD_V], args={"threshold": -0.1}), "bad_value", 42),
    "NaN threshold": (_req("update", [GOOD_Q, GOOD_V], args={"threshold": float("nan")}), "bad_value", 42),
    "negative age_noise": (_req("update", [GOOD_Q, GOOD_V], args={"threshold": 0.1, "age_noise": -1}),
                           "bad_value", 42),
    "negative seed": (_req("update", [GOOD_Q, GOOD_V], args={"threshold": 0.1, "seed": -5}), "bad_value", 42),
    "item_ids float": (_req("update", [GOOD_Q, GOOD_V, ("item_ids", "float32", [2], _f32(2).tobytes())], **UPD),
                       "bad_dtype", 42),
    "negative put age": (_req("put", [("slots", "int64", [1], np.array([3], np.int64).tobytes()),
                                      ("keys", "float32", [1, DK], _f32(1, DK).tobytes()),
                                      ("values", "float32", [1, DV], _f32(1, DV).tobytes()),
                                      ("ages", "float32", [1], _f32(1, fill=-2).tobytes())]), "bad_value", 42),
    "name ../x": ([header_bytes(v=1, op="info", id=42, memory="../x")], "bad_value", 42),
    "name .hidden": ([header_bytes(v=1, op="export", id=42, memory=".hidden")], "bad_value", 42),
    "name 65 chars": ([header_bytes(v=1, op="create", id=42, memory="a" * 65,
                                    args={"capacity": 2, "key_dim": 2, "value_dim": 2})], "bad_value", 42),
    "name not a str": ([header_bytes(v=1, op="info", id=42, memory=7)], "bad_request", 42),
    "unknown fields entry": (_req("query", [GOOD_Q], args={"k": 1, "fields": ["keys", "colour"]}), "bad_value", 42),
    "fields not a list": (_req("query", [GOOD_Q], args={"k": 1, "fields": "keys"}), "bad_request", 42),
    "batch > capacity": (_req("update", [_q(_f32(M + 1, DK)), _v(_f32(M + 1, DV))], **UPD), "too_large", 42),
    "batch > max-batch": (_req("query", [_q(_f32(40, DK))], args={"k": 1}), "too_large", 42),
    "total over max-message-bytes": (_req("query", [_q(_f32(1, DK))], args={"k": 1}) [:1]
                                     + [b"x" * (MAX_MSG // 2)] * 3, "too_large", 42),
    "no such memory": (_req("query", [GOOD_Q], args={"k": 1}, memory="ghost"), "no_such_memory", 42),
    "create capacity 0": ([header_bytes(v=1, op="create", id=42, memory="z",
                                        args={"capacity": 0, "key_dim": 2, "value_dim": 2})], "bad_value", 42),
    "create exists with other shape": ([header_bytes(v=1, op="create", id=42,
                                                     args={"capacity": M, "key_dim": DK + 1, "value_dim": DV})],
                                       "exists", 42),
    "create over max-memory-bytes": ([header_bytes(v=1, op="create", id=42, memory="big",
                                                   args={"capacity": 10**6, "key_dim": 512, "value_dim": 313})],
                                     "too_large", 42),
    "empty header after delimiter": ([b""], "bad_request", None),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("malformed")
    args = ["--max-message-bytes", str(MAX_MSG), "--max-batch", "36", "--max-memory-bytes", str(64 << 20)]
    with running_server(d / "data", capacity=M, key_dim=DK, value_dim=DV, extra_args=args) as srv:
        baseline = raw_request(srv.endpoint, [header_bytes(v=1, op="export", id=0)])
        yield srv, baseline
        assert srv.stop() == 0


def _assert_alive_and_unchanged(srv, baseline):
    pong, _ = raw_request(srv.endpoint, [header_bytes(v=1, op="ping", id="p")])
    assert pong["ok"] is True
    now = raw_request(srv.endpoint, [header_bytes(v=1, op="export", id=0)])
    assert now[0]["result"]["version"] == baseline[0]["result"]["version"]
    assert now[1] == baseline[1], "a rejected request changed the memory"
    info, _ = raw_request(srv.endpoint, [header_bytes(v=1, op="info", id=1)])
    assert info["result"]["memories"] == ["default"]


def test_enough_kinds():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_gets_error_and_changes_nothing(server, name):
    srv, baseline = server
    frames, code, echo = CASES[name]
    got = raw_request(srv.endpoint, frames)
    assert got is not None, f"no reply to {name!r}"
    reply, arrays = got
    assert reply["ok"] is False and reply["v"] == 1 and arrays == []
    assert reply["error"]["code"] == code, reply["error"]
    assert reply["id"] == echo
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    _assert_alive_and_unchanged(srv, baseline)


def test_oversize_frame_disconnects_peer_and_server_stays_up(server):
    srv, baseline = server
    frames = [header_bytes(v=1, op="ping", id=5), b"x" * (MAX_MSG + 1)]
    assert raw_request(srv.endpoint, frames, timeout_s=2.0) is None  # ZMQ_MAXMSGSIZE: dropped, no reply
    _assert_alive_and_unchanged(srv, baseline)


def test_messages_never_reach_a_path(server, tmp_path_factory):
    srv, baseline = server
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(srv.endpoint)
    try:
        for bad in ("../../etc", "/abs", "a\x00b", "..", "x/y"):
            sock.send_multipart([header_bytes(v=1, op="create", id=bad, memory=bad,
                                              args={"capacity": 2, "key_dim": 2, "value_dim": 2})])
            assert sock.poll(20_000)
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["error"]["code"] == "bad_value"
    finally:
        sock.close(0)
    _assert_alive_and_unchanged(srv, baseline)

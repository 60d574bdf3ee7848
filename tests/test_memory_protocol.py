"""Unit tests of memory_server.protocol: frame encoding, header decoding, names, error classes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from memory_server import protocol as P


def _roundtrip(arrays):
    frames = P.encode_frames({"v": 1, "id": 7}, arrays)
    header = P.unpack_header(frames[0])
    return header, P.decode_arrays(header["arrays"], [bytes(memoryview(f)) for f in frames[1:]])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "int32", "uint8", "bool"])
def test_roundtrip_every_dtype(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 3).astype(dtype)
    header, out = _roundtrip([("a", a)])
    assert header["arrays"] == [["a", dtype, [2, 3, 4]]]
    np.testing.assert_array_equal(out["a"], a)
    assert out["a"].dtype == a.dtype


def test_roundtrip_noncontiguous_bigendian_and_empty():
    base = np.arange(40, dtype=np.float32).reshape(5, 8)
    big = np.arange(6, dtype=">i8")
    empty = np.zeros((0, 4), np.float32)
    _, out = _roundtrip([("t", base.T), ("big", big), ("e", empty)])
    np.testing.assert_array_equal(out["t"], base.T)
    np.testing.assert_array_equal(out["big"], big)
    assert out["big"].dtype == np.dtype("<i8")
    assert out["e"].shape == (0, 4)


def test_unpack_header_rejects_non_msgpack_and_non_map():
    with pytest.raises(P.BadRequest, match="not msgpack"):
        P.unpack_header(b"\xc1")
    with pytest.raises(P.BadRequest, match="must be a msgpack map"):
        P.unpack_header(msgpack.packb([1, 2]))


def test_decode_arrays_checks_frames_dtype_and_bytes():
    with pytest.raises(P.BadRequest, match="lists 1 arrays but the message has 0"):
        P.decode_arrays([["q", "float32", [1, 2]]], [])
    with pytest.raises(P.BadDtype, match="float64"):
        P.decode_arrays([["q", "float64", [1]]], [b"\0" * 8])
    with pytest.raises(P.BadRequest, match="needs 8 bytes, its frame has 4"):
        P.decode_arrays([["q", "float32", [1, 2]]], [b"\0" * 4])
    with pytest.raises(P.BadShape, match="shape"):
        P.decode_arrays([["q", "float32", [-1]]], [b""])
    with pytest.raises(P.BadRequest, match="shape"):
        P.decode_arrays([["q", "float32", [1.0]]], [b"\0" * 4])
    with pytest.raises(P.BadRequest, match="listed twice"):
        P.decode_arrays([["q", "uint8", [1]], ["q", "uint8", [1]]], [b"a", b"b"])
    with pytest.raises(P.BadRequest, match=r"\[name, dtype, shape\]"):
        P.decode_arrays([["q", "uint8"]], [b"a"])


@pytest.mark.parametrize("name", ["default", "a", "A-b_c.9", "x" * 64, "a..b"])
def test_valid_memory_names(name):
    assert P.check_memory_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "../x", "a/b", "x" * 65, "sp ace", "é"])
def test_invalid_memory_names(name):
    with pytest.raises(P.BadValue, match="memory name"):
        P.check_memory_name(name)


def test_memory_name_must_be_str():
    with pytest.raises(P.BadRequest):
        P.check_memory_name(5)


def test_error_classes_cover_every_code():
    codes = {"bad_request", "unsupported_version", "unknown_op", "no_such_memory", "exists", "bad_shape",
             "bad_dtype", "bad_value", "too_large", "busy", "internal"}
    assert set(P.ERROR_CODES) == codes
    for code in codes:
        exc = P.error_from_code(code, "msg")
        assert isinstance(exc, P.MemoryServerError) and exc.code == code and exc.message == "msg"
    odd = P.error_from_code("future_code", "m")
    assert type(odd) is P.MemoryServerError and odd.code == "future_code"


def test_ids_and_numbers():
    assert P.valid_request_id(1) and P.valid_request_id("1")
    assert not P.valid_request_id(True) and not P.valid_request_id(1.5) and not P.valid_request_id(None)
    assert P.is_number(0.5) and P.is_number(3) and not P.is_number(False)

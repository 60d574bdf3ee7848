"""Wire protocol v1 (PROTOCOL.md): msgpack header frame + raw little-endian array frames.

Owns the constants, the error-code exceptions shared by server, client and in-process memory, and
encode/decode of headers and array frames. Pure numpy + msgpack; imports nothing else of the package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
SERVER_NAME = "pccnet-memory-server 0.1.0"
DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
DEFAULT_MEMORY = "default"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_BATCH = 65_536
DEFAULT_MAX_MEMORY_BYTES = 8 * 1024**3
IDEMPOTENCY_WINDOW = 100_000
MAX_NDIM = 8

# Wire dtype names -> explicit little-endian numpy dtypes (the wire is little-endian on every host).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "uint8": np.dtype("|u1"),
    "bool": np.dtype("|b1"),
}
_NAME_OF_KIND = {(v.kind, v.itemsize): k for k, v in DTYPES.items()}

OPS = ("ping", "info", "create", "drop", "query", "update", "get", "put", "export", "snapshot", "stats")
MUTATING_OPS = frozenset({"create", "drop", "update", "put"})
QUERY_FIELDS = ("keys", "values", "ages", "item_ids")
_MEMORY_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}\Z")


class MemoryServerError(Exception):
    """An error reply of the memory server: `code` is one of PROTOCOL.md's error codes."""

    code = "internal"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# STYLE.md names the protocol-level exception ProtocolError; it is the same family.
ProtocolError = MemoryServerError


class BadRequest(MemoryServerError):
    code = "bad_request"


class UnsupportedVersion(MemoryServerError):
    code = "unsupported_version"


class UnknownOp(MemoryServerError):
    code = "unknown_op"


class NoSuchMemory(MemoryServerError):
    code = "no_such_memory"


class Exists(MemoryServerError):
    code = "exists"


class BadShape(MemoryServerError):
    code = "bad_shape"


class BadDtype(MemoryServerError):
    code = "bad_dtype"


class BadValue(MemoryServerError):
    code = "bad_value"


class TooLarge(MemoryServerError):
    code = "too_large"


class Busy(MemoryServerError):
    code = "busy"


class Internal(MemoryServerError):
    code = "internal"


ERROR_CLASSES: dict[str, type[MemoryServerError]] = {
    cls.code: cls
    for cls in (BadRequest, UnsupportedVersion, UnknownOp, NoSuchMemory, Exists, BadShape, BadDtype,
                BadValue, TooLarge, Busy, Internal)
}
ERROR_CODES = tuple(ERROR_CLASSES)


def error_from_code(code: str, message: str) -> MemoryServerError:
    """The exception instance for an error reply (unknown codes keep their code on the base class)."""
    cls = ERROR_CLASSES.get(code)
    return cls(message) if cls is not None else MemoryServerError(message, code=str(code))


def is_int(x: Any) -> bool:
    """True for a msgpack integer (bool is not an integer on the wire)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """True for a msgpack int or float (not bool)."""
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


def valid_request_id(x: Any) -> bool:
    """Request ids are str or int (1 and "1" differ)."""
    return isinstance(x, str) or is_int(x)


def check_memory_name(name: Any) -> str:
    """Return `name` if it is a valid memory name, else raise BadValue (BadRequest if not a str)."""
    if not isinstance(name, str):
        raise BadRequest(f"field 'memory' must be a str, got {type(name).__name__} {name!r:.80}")
    if not _MEMORY_NAME.match(name) or name.startswith("."):
        raise BadValue(
            f"memory name {name!r:.100} is invalid: 1 to 64 characters of [A-Za-z0-9_.-], not starting with '.'"
        )
    return name


def wire_dtype_name(arr: np.ndarray) -> str:
    """The wire dtype name of a numpy array, or ValueError if the dtype has none."""
    name = _NAME_OF_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if name is None:
        raise ValueError(f"dtype {arr.dtype} has no wire name; use one of {sorted(DTYPES)}")
    return name


def wire_array(arr: np.ndarray) -> np.ndarray:
    """C-contiguous little-endian version of `arr` (no copy when it already is)."""
    arr = np.asarray(arr)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.ascontiguousarray(arr)


def pack_header(header: dict[str, Any]) -> bytes:
    """msgpack bytes of a header map."""
    return msgpack.packb(header, use_bin_type=True)


def encode_frames(header: dict[str, Any], arrays: Iterable[tuple[str, np.ndarray]] = ()) -> list[Any]:
    """[header bytes, array buffers...]; fills header['arrays'] from `arrays` (name, ndarray) pairs."""
    bufs: list[Any] = []
    specs: list[list[Any]] = []
    for name, arr in arrays:
        a = wire_array(arr)
        specs.append([name, wire_dtype_name(a), list(a.shape)])
        bufs.append(a.reshape(-1).view(np.uint8) if a.size else b"")
    if specs:
        header = dict(header, arrays=specs)
    return [pack_header(header), *bufs]


def unpack_header(frame: Any) -> dict[str, Any]:
    """Decode a header frame; BadRequest if it is not a msgpack map."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=False, use_list=True)
    except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"header frame is not msgpack ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise BadRequest(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def _parse_spec(spec: Any, index: int) -> tuple[str, str, tuple[int, ...]]:
    if not isinstance(spec, (list, tuple)) or len(spec) != 3:
        raise BadRequest(f"arrays[{index}] must be [name, dtype, shape], got {spec!r:.120}")
    name, dtype, shape = spec
    if not isinstance(name, str) or not name:
        raise BadRequest(f"arrays[{index}] name must be a non-empty str, got {name!r:.80}")
    if not isinstance(dtype, str):
        raise BadRequest(f"arrays[{index}] ({name}) dtype must be a str, got {dtype!r:.80}")
    if dtype not in DTYPES:
        raise BadDtype(f"array '{name}' has dtype {dtype!r:.40}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or len(shape) > MAX_NDIM or not all(
        is_int(d) and d >= 0 for d in shape
    ):
        raise BadRequest(f"array '{name}' shape must be a list of at most {MAX_NDIM} ints >= 0, got {shape!r:.120}")
    return name, dtype, tuple(int(d) for d in shape)


def decode_arrays(specs: Any, frames: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map array name -> ndarray view over `frames` as described by the header's `arrays` list."""
    if specs is None:
        specs = []
    if not isinstance(specs, (list, tuple)):
        raise BadRequest(f"field 'arrays' must be a list, got {type(specs).__name__}")
    if len(specs) != len(frames):
        raise BadRequest(f"header lists {len(specs)} arrays but the message has {len(frames)} array frames")
    out: dict[str, np.ndarray] = {}
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        name, dtype_name, shape = _parse_spec(spec, i)
        if name in out:
            raise BadRequest(f"array '{name}' is listed twice")
        dtype = DTYPES[dtype_name]
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        nbytes = memoryview(buf).nbytes
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        if nbytes != expected:
            raise BadRequest(
                f"array '{name}' {dtype_name}{list(shape)} needs {expected} bytes, its frame has {nbytes}"
            )
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.empty(shape, dtype)
    return out


def frame_size(frame: Any) -> int:
    """Byte length of a zmq Frame, bytes or buffer."""
    if hasattr(frame, "buffer"):
        return memoryview(frame.buffer).nbytes
    return memoryview(frame).nbytes


def request_header(op: str, req_id: str | int, memory: str | None = None,
                   args: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request header map (without 'arrays', which encode_frames adds)."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "op": op, "id": req_id}
    if memory is not None:
        header["memory"] = memory
    if args:
        header["args"] = args
    return header


def ok_header(req_id: Any, result: dict[str, Any]) -> dict[str, Any]:
    """A success reply header (without 'arrays')."""
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result}


def error_header(req_id: Any, code: str, message: str) -> dict[str, Any]:
    """An error reply header."""
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}

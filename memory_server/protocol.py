"""Wire protocol v1 (PROTOCOL.md): msgpack header frame + raw little-endian array frames.

Owns the constants, the error-code exceptions shared by server, client and in-process memory, and
encode/decode of headers and array frames. Pure numpy + msgpack; imports nothing else of the package.
"""

from __future__ import annotations

import re
import reprlib
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
DEFAULT_MAX_MEMORIES = 1024
IDEMPOTENCY_WINDOW = 100_000
MAX_NDIM = 8
MAX_DIM = 2**31  # every dimension of an `arrays` entry is an int in [0, MAX_DIM)
MAX_ID_BYTES = 256  # a str request id is at most this many UTF-8 bytes
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_ARG_VALUE = 1e6  # threshold and age_noise are finite and at most this
# A real header is a few hundred bytes. Bounding it bounds what msgpack builds from it: a 1-byte empty
# list becomes a 56-byte Python object, so an unbounded header could expand ~50x in RAM.
MAX_HEADER_BYTES = 64 * 1024

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

    def __init__(self, message: str, code: str | None = None, limit: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.limit = limit  # the limit that refused the request, for memsrv_limit_refusals_total{limit}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"



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


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3
_SHORT.maxlong = 40


def short_repr(x: Any) -> str:
    """A repr of at most ~100 characters whose cost does not grow with `x` (reprlib renders prefixes).

    Every error message that quotes a client's value uses it: a 2M-element id is never rendered in full
    only to be cut.
    """
    try:
        return _SHORT.repr(x)
    except Exception:  # noqa: BLE001 - a hostile __repr__ must not turn a bad request into a crash
        return f"<{type(x).__name__}>"


def is_int(x: Any) -> bool:
    """True for a msgpack integer (bool is not an integer on the wire)."""
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x: Any) -> bool:
    """True for a msgpack int or float (not bool)."""
    return (isinstance(x, (int, float))) and not isinstance(x, bool)


def valid_request_id(x: Any) -> bool:
    """Request ids are an int64 or a str of at most MAX_ID_BYTES UTF-8 bytes (1 and "1" differ)."""
    if isinstance(x, str):
        # len() first: a str with more characters than the limit has more bytes, no need to encode it.
        return len(x) <= MAX_ID_BYTES and len(x.encode("utf-8", "surrogatepass")) <= MAX_ID_BYTES
    return is_int(x) and INT64_MIN <= x <= INT64_MAX


def id_problem(x: Any) -> str:
    """What is wrong with an invalid request id, for the error message."""
    if isinstance(x, str):
        return f"a str of {len(x.encode('utf-8', 'surrogatepass'))} UTF-8 bytes (at most {MAX_ID_BYTES} allowed)"
    if is_int(x):
        return f"the int {short_repr(x)}, outside the int64 range"
    return f"{type(x).__name__} {short_repr(x)}"


def check_memory_name(name: Any) -> str:
    """Return `name` if it is a valid memory name, else raise BadValue (BadRequest if not a str)."""
    if not isinstance(name, str):
        raise BadRequest(f"field 'memory' must be a str, got {type(name).__name__} {short_repr(name)}")
    if len(name) > 64 or not _MEMORY_NAME.match(name) or name.startswith("."):
        raise BadValue(f"memory name {short_repr(name)} is invalid: 1 to 64 characters of [A-Za-z0-9_.-], "
                       f"not starting with '.'")
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


def frame_size(frame: Any) -> int:
    """Byte length of a zmq Frame, bytes or buffer."""
    if hasattr(frame, "buffer"):
        return memoryview(frame.buffer).nbytes
    return memoryview(frame).nbytes


def unpack_header(frame: Any, max_bytes: int | None = None) -> dict[str, Any]:
    """Decode a header frame; BadRequest if it is not a msgpack map or is over `max_bytes` (when given)."""
    if max_bytes is not None and frame_size(frame) > max_bytes:
        raise BadRequest(f"header frame of {frame_size(frame)} bytes exceeds the {max_bytes}-byte header limit",
                         limit="header_bytes")
    buf = frame.buffer if hasattr(frame, "buffer") else frame
    try:
        header = msgpack.unpackb(buf, raw=False, strict_map_key=False, use_list=True)
    except (msgpack.UnpackException, ValueError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"header frame is not msgpack ({type(exc).__name__}: {short_repr(str(exc))})") from None
    if not isinstance(header, dict):
        raise BadRequest(f"header must be a msgpack map, got {type(header).__name__}")
    return header


def parse_spec(spec: Any, index: int, max_bytes: int) -> tuple[str, str, tuple[int, ...]]:
    """Validate one `[name, dtype, shape]` entry before anything is allocated.

    Dimensions are ints in [0, 2**31); the byte size must fit `max_bytes` (too_large), and so must the
    shape with its zero dimensions read as 1 (bad_shape): numpy refuses to build an empty array whose
    other dimensions overflow, which is how a request with a 0-byte frame used to end the process.
    """
    if not isinstance(spec, (list, tuple)) or len(spec) != 3:
        raise BadRequest(f"arrays[{index}] must be [name, dtype, shape], got {short_repr(spec)}")
    name, dtype, shape = spec
    if not isinstance(name, str) or not name:
        raise BadRequest(f"arrays[{index}] name must be a non-empty str, got {short_repr(name)}")
    if not isinstance(dtype, str):
        raise BadRequest(f"arrays[{index}] ({short_repr(name)}) dtype must be a str, got {short_repr(dtype)}")
    if dtype not in DTYPES:
        raise BadDtype(f"array {short_repr(name)} has dtype {short_repr(dtype)}; allowed: {', '.join(DTYPES)}")
    if not isinstance(shape, (list, tuple)) or not all(is_int(d) for d in shape):
        raise BadRequest(f"array {short_repr(name)} shape must be a list of ints, got {short_repr(shape)}")
    if len(shape) > MAX_NDIM or not all(0 <= d < MAX_DIM for d in shape):
        raise BadShape(f"array {short_repr(name)} shape {short_repr(shape)}: at most {MAX_NDIM} dimensions, "
                       f"each an int in [0, 2**31)", limit="shape")
    itemsize = DTYPES[dtype].itemsize
    count = outer = 1
    for d in shape:
        count *= d
        outer *= max(d, 1)
    if count * itemsize > max_bytes:
        raise TooLarge(f"array {short_repr(name)} {dtype}{list(shape)} holds {count * itemsize} bytes, over "
                       f"the {max_bytes}-byte message limit", limit="message_bytes")
    if outer * itemsize > max_bytes:
        raise BadShape(f"array {short_repr(name)} {dtype}{list(shape)} is empty, but its other dimensions "
                       f"describe {outer * itemsize} bytes, over the {max_bytes}-byte message limit", limit="shape")
    return name, dtype, tuple(shape)


def decode_arrays(specs: Any, frames: Sequence[Any], max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> dict[str, np.ndarray]:
    """Map array name -> ndarray view over `frames` as described by the header's `arrays` list.

    Every spec (name, dtype, shape, size) is checked before any frame is read or any array built.
    """
    if specs is None:
        specs = []
    if not isinstance(specs, (list, tuple)):
        raise BadRequest(f"field 'arrays' must be a list, got {type(specs).__name__}")
    if len(specs) != len(frames):
        raise BadRequest(f"header lists {len(specs)} arrays but the message has {len(frames)} array frames")
    parsed = [parse_spec(spec, i, max_bytes) for i, spec in enumerate(specs)]
    out: dict[str, np.ndarray] = {}
    for (name, dtype_name, shape), frame in zip(parsed, frames, strict=True):
        if name in out:
            raise BadRequest(f"array {short_repr(name)} is listed twice")
        dtype = DTYPES[dtype_name]
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        nbytes = memoryview(buf).nbytes
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        if nbytes != expected:
            raise BadRequest(
                f"array {short_repr(name)} {dtype_name}{list(shape)} needs {expected} bytes, its frame has {nbytes}"
            )
        out[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.empty(shape, dtype)
    return out


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


"""The one validation path of a request: header fields, args and arrays (PROTOCOL.md, MEMORY_SERVER.md).

`parse_head` checks the header fields in the documented order (id, v, op, total size, memory name,
args) for the wire path (`Engine.handle_frames`), the in-process path (`Engine.execute`) and the
server's early refusals (busy, too_large at admission), so the three can never disagree. An error
raised while parsing carries the id and op read so far, which the error reply echoes.
The remaining helpers check op arguments and arrays; every message quotes values through
`short_repr`, so rendering a hostile value costs a bounded prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules
from .protocol import (
    DEFAULT_MEMORY,
    DTYPES,
    MAX_ARG_VALUE,
    OPS,
    PROTOCOL_VERSION,
    BadDtype,
    BadRequest,
    BadShape,
    BadValue,
    MemoryServerError,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
    check_memory_name,
    id_problem,
    is_int,
    is_number,
    short_repr,
    valid_request_id,
)

# Scalar args and arrays each op takes; anything else is bad_request (a typo must not change semantics).
OP_ARGS = {"create": {"capacity", "key_dim", "value_dim", "seed"}, "query": {"k", "fields"},
           "update": {"threshold", "age_noise", "seed"}}
OP_ARRAYS = {"query": ({"q"}, {"targets"}), "update": ({"q", "v"}, {"item_ids"}), "get": ({"slots"}, set()),
             "put": ({"slots", "keys", "values"}, {"ages", "item_ids"})}
FLOATS = ("float32", "float16")
_WIRE_NAMES = {dt: name for name, dt in DTYPES.items()}  # dtype.name is slow on a hot path


@dataclass(frozen=True)
class Head:
    """The validated header fields of one request."""

    req_id: Any
    op: str
    memory: str
    args: dict[str, Any]


def _tag(exc: MemoryServerError, req_id: Any, op: str | None) -> MemoryServerError:
    exc.req_id, exc.op = req_id, op  # what the error reply echoes
    return exc


def failed_id_op(exc: BaseException) -> tuple[Any, str | None]:
    """(id, op) an error raised by parse_head had read so far (None, None for other exceptions)."""
    return getattr(exc, "req_id", None), getattr(exc, "op", None)


def parse_head(header: dict[str, Any], total_bytes: int = 0, max_bytes: int | None = None) -> Head:
    """Validate a header map in PROTOCOL order; raises a MemoryServerError tagged with the id and op read."""
    raw_id = header.get("id")
    if not valid_request_id(raw_id):
        raise _tag(BadRequest(f"field 'id' must be an int64 or a str of at most 256 UTF-8 bytes, got "
                              f"{id_problem(raw_id)}", limit="id" if raw_id is not None else None), None, None)
    v = header.get("v")
    if not is_int(v):
        raise _tag(BadRequest(f"field 'v' must be the int protocol version, got {short_repr(v)}"), raw_id, None)
    if v != PROTOCOL_VERSION:
        raise _tag(UnsupportedVersion(f"protocol version {short_repr(v)} is not supported; this server speaks "
                                      f"{PROTOCOL_VERSION}"), raw_id, None)
    op = header.get("op")
    if not isinstance(op, str):
        raise _tag(BadRequest(f"field 'op' must be a str, got {type(op).__name__} {short_repr(op)}"), raw_id, None)
    if op not in OPS:
        raise _tag(UnknownOp(f"op {short_repr(op)} is not one of {', '.join(OPS)}"), raw_id, None)
    if max_bytes is not None and total_bytes > max_bytes:
        raise _tag(TooLarge(f"request of {total_bytes} bytes exceeds --max-message-bytes {max_bytes}",
                            limit="message_bytes"), raw_id, op)
    try:
        memory = check_memory_name(header.get("memory", DEFAULT_MEMORY))
    except MemoryServerError as exc:
        raise _tag(exc, raw_id, op) from None
    args = header.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise _tag(BadRequest(f"field 'args' must be a map, got {type(args).__name__}"), raw_id, op)
    return Head(raw_id, op, memory, args)


def peek_id_op(header: Any) -> tuple[Any, str | None]:
    """The id and op an early refusal (busy, too_large) echoes: what parse_head accepts of them, else None."""
    if not isinstance(header, dict):
        return None, None
    try:
        head = parse_head(header)
    except MemoryServerError as exc:
        return failed_id_op(exc)
    return head.req_id, head.op


def check_arg_names(head: Head, arrays: dict[str, Any]) -> None:
    """Unknown args and unexpected arrays of the op are bad_request."""
    unknown = set(head.args) - OP_ARGS.get(head.op, set())
    if unknown:
        raise BadRequest(f"op '{head.op}' does not take arg(s) {short_repr(sorted(map(str, unknown)))}")
    required, optional = OP_ARRAYS.get(head.op, (set(), set()))
    extra = set(arrays) - required - optional
    if extra:
        raise BadRequest(f"op '{head.op}' does not take array(s) {short_repr(sorted(extra))}")


# ---- scalar args ----------------------------------------------------------------------------------

def int_arg(op: str, args: dict, name: str, lo: int | None = None, hi: int | None = None,
            required: bool = True) -> int | None:
    """An int arg in [lo, hi] (bad_value outside), bad_request when missing or not an int."""
    x = args.get(name)
    if x is None:
        if required:
            raise BadRequest(f"op '{op}' needs the int arg '{name}'")
        return None
    if not is_int(x):
        raise BadRequest(f"arg '{name}' must be an int, got {type(x).__name__} {short_repr(x)}")
    if lo is not None and x < lo:
        raise BadValue(f"arg '{name}' = {short_repr(x)} must be >= {lo}")
    if hi is not None and x > hi:
        raise BadValue(f"arg '{name}' = {short_repr(x)} must be <= {hi}")
    return x


def float_arg(op: str, args: dict, name: str, default: float | None = None) -> float:
    """A finite number in [0, MAX_ARG_VALUE] (PROTOCOL.md "Arguments")."""
    x = args.get(name)
    if x is None:
        if default is None:
            raise BadRequest(f"op '{op}' needs the number arg '{name}'")
        return default
    if not is_number(x):
        raise BadRequest(f"arg '{name}' must be a number, got {type(x).__name__} {short_repr(x)}")
    try:
        x = float(x)
    except OverflowError:  # a msgpack int beyond float range is not a finite number either
        raise BadValue(f"arg '{name}' = {short_repr(x)} must be a finite number in [0, {MAX_ARG_VALUE:g}]") from None
    if not np.isfinite(x) or x < 0 or x > MAX_ARG_VALUE:
        raise BadValue(f"arg '{name}' = {x!r} must be a finite number in [0, {MAX_ARG_VALUE:g}]", limit="args")
    return x


# ---- arrays ---------------------------------------------------------------------------------------

def array(arrays: dict[str, np.ndarray], name: str, dtypes: tuple[str, ...], shape: tuple[int | None, ...],
          required: bool = True) -> np.ndarray | None:
    """The array `name` checked for dtype and shape (None entries are free); float16 becomes float32."""
    a = arrays.get(name)
    if a is None:
        if required:
            raise BadRequest(f"required array '{name}' is missing")
        return None
    dname = _WIRE_NAMES.get(a.dtype, str(a.dtype))
    if dname not in dtypes:
        raise BadDtype(f"array '{name}' has dtype {dname}; this op takes {' or '.join(dtypes)}")
    if a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape, strict=True)):
        want_s = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise BadShape(f"array '{name}' has shape {list(a.shape)}, expected {want_s}")
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    return a


def check_finite(name: str, a: np.ndarray) -> None:
    """bad_value naming the first NaN or Inf."""
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise BadValue(f"array '{name}' holds NaN or Inf (first at index {bad})")


def unit_rows(name: str, a: np.ndarray) -> np.ndarray:
    """Finite, non-zero rows normalised to unit L2 norm (float32)."""
    check_finite(name, a)
    norms = rules.row_norms(a)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise BadValue(f"array '{name}' row {int(zero[0])} has zero norm")
    return rules.normalize_rows(a)


def distributions(name: str, a: np.ndarray) -> np.ndarray:
    """Finite, non-negative, non-zero rows normalised to sum 1 (float64)."""
    check_finite(name, a)
    neg = np.argwhere(a < 0)
    if neg.size:
        raise BadValue(f"array '{name}' has a negative entry at index {neg[0].tolist()}")
    sums = a.astype(np.float64).sum(axis=1)
    zero = np.flatnonzero(sums == 0)
    if zero.size:
        raise BadValue(f"array '{name}' row {int(zero[0])} is all zeros")
    return rules.normalize_distributions(a)


def slots(name: str, a: np.ndarray, capacity: int) -> np.ndarray:
    """Slot indices in [0, capacity)."""
    bad = np.flatnonzero((a < 0) | (a >= capacity))
    if bad.size:
        raise BadValue(f"array '{name}' entry {int(bad[0])} = {int(a[bad[0]])} is out of range [0, {capacity})")
    return a


REPLY_HEADER_BYTES = 1024  # a bound on a reply's msgpack header (result map and array specs)


def check_reply_size(op: str, array_bytes: int, max_bytes: int) -> None:
    """too_large, before a reply is built, when its arrays and header would exceed the message limit."""
    nbytes = array_bytes + REPLY_HEADER_BYTES
    if nbytes > max_bytes:
        raise TooLarge(f"the {op} reply would be {nbytes} bytes, over --max-message-bytes {max_bytes}",
                       limit="reply_bytes")

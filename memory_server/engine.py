"""Engine: validates requests, applies ops to the store, logs effects, remembers idempotent replies.

Transport-free: the ZeroMQ server feeds it decoded frames, `local.InProcessMemory` calls `execute`
directly, so both paths share every check and every error message. Validation order (which error a
request with several faults gets) is: header, version, op, size, memory name, idempotency, args,
arrays (presence, dtype, shape, values), limits.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter as CountMap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import rules
from .durability import Durability
from .effects import DropEffect, PutEffect
from .protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MEMORY,
    DTYPES,
    OPS,
    PROTOCOL_VERSION,
    QUERY_FIELDS,
    SERVER_NAME,
    BadDtype,
    BadRequest,
    BadShape,
    BadValue,
    Internal,
    MemoryServerError,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
    check_memory_name,
    decode_arrays,
    frame_size,
    is_int,
    is_number,
    unpack_header,
    valid_request_id,
)
from .store import Memory, MemoryStore

log = logging.getLogger(__name__)

_ARGS = {"create": {"capacity", "key_dim", "value_dim", "seed"}, "query": {"k", "fields"},
         "update": {"threshold", "age_noise", "seed"}}
_ARRAYS = {"query": ({"q"}, {"targets"}), "update": ({"q", "v"}, {"item_ids"}), "get": ({"slots"}, set()),
           "put": ({"slots", "keys", "values"}, {"ages", "item_ids"})}
_FLOATS = ("float32", "float16")
_WIRE_NAMES = {dt: name for name, dt in DTYPES.items()}  # dtype.name is slow on a hot path


class FatalError(RuntimeError):
    """An internal invariant broke after an effect was logged: the process must stop (WAL is the truth)."""


@dataclass
class Limits:
    """Server-wide request and memory limits (PROTOCOL.md)."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES


@dataclass
class Reply:
    """The outcome of one request: a result with arrays, an error, or a deferred snapshot reply."""

    req_id: Any
    op: str | None
    result: dict[str, Any] | None = None
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)
    error: MemoryServerError | None = None
    duplicate: bool = False
    deferred: bool = False
    mutated: bool = False

    @property
    def code(self) -> str:
        return "duplicate" if self.duplicate else ("ok" if self.error is None else self.error.code)


# ---- argument and array checks ----------------------------------------------------------------

def _int_arg(op: str, args: dict, name: str, lo: int | None = None, required: bool = True) -> int | None:
    x = args.get(name)
    if x is None:
        if required:
            raise BadRequest(f"op '{op}' needs the int arg '{name}'")
        return None
    if not is_int(x):
        raise BadRequest(f"arg '{name}' must be an int, got {type(x).__name__} {x!r:.60}")
    if lo is not None and x < lo:
        raise BadValue(f"arg '{name}' = {x} must be >= {lo}")
    return x


def _float_arg(op: str, args: dict, name: str, default: float | None = None) -> float:
    x = args.get(name)
    if x is None:
        if default is None:
            raise BadRequest(f"op '{op}' needs the number arg '{name}'")
        return default
    if not is_number(x):
        raise BadRequest(f"arg '{name}' must be a number, got {type(x).__name__} {x!r:.60}")
    x = float(x)
    if not np.isfinite(x) or x < 0:
        raise BadValue(f"arg '{name}' = {x!r} must be a finite number >= 0")
    return x


def _array(arrays: dict[str, np.ndarray], name: str, dtypes: tuple[str, ...], shape: tuple[int | None, ...],
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


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise BadValue(f"array '{name}' holds NaN or Inf (first at index {bad})")


def _unit_rows(name: str, a: np.ndarray) -> np.ndarray:
    """Finite, non-zero rows normalised to unit L2 norm (float32)."""
    _check_finite(name, a)
    norms = rules.row_norms(a)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise BadValue(f"array '{name}' row {int(zero[0])} has zero norm")
    return rules.normalize_rows(a)


def _distributions(name: str, a: np.ndarray) -> np.ndarray:
    """Finite, non-negative, non-zero rows normalised to sum 1 (float64)."""
    _check_finite(name, a)
    neg = np.argwhere(a < 0)
    if neg.size:
        raise BadValue(f"array '{name}' has a negative entry at index {neg[0].tolist()}")
    sums = a.astype(np.float64).sum(axis=1)
    zero = np.flatnonzero(sums == 0)
    if zero.size:
        raise BadValue(f"array '{name}' row {int(zero[0])} is all zeros")
    return rules.normalize_distributions(a)


def _slots(name: str, a: np.ndarray, capacity: int) -> np.ndarray:
    bad = np.flatnonzero((a < 0) | (a >= capacity))
    if bad.size:
        raise BadValue(f"array '{name}' entry {int(bad[0])} = {int(a[bad[0]])} is out of range [0, {capacity})")
    return a


class Engine:
    """Request execution over one MemoryStore and its Durability."""

    def __init__(self, store: MemoryStore, durability: Durability, limits: Limits | None = None,
                 metrics: Any = None) -> None:
        self.store = store
        self.durability = durability
        self.limits = limits or Limits()
        self.metrics = metrics
        self.requests: CountMap[str] = CountMap()
        self.errors: CountMap[str] = CountMap()
        self.queue_depth = 0
        self.metrics_port: int | None = None
        self.fault_ops: frozenset[str] = frozenset()  # test hook: these ops raise a bug (-> `internal`)
        for mem in store.memories.values():
            self._gauges(mem)

    # ---- entry points ---------------------------------------------------------------------------

    def handle_frames(self, frames: list[Any]) -> Reply:
        """Execute one request given its frames (header first, envelope already stripped)."""
        req_id: Any = None
        op: str | None = None
        try:
            if not frames:
                raise BadRequest("message has no header frame")
            header = unpack_header(frames[0])
            raw_id = header.get("id")
            req_id = raw_id if valid_request_id(raw_id) else None
            if req_id is None:
                raise BadRequest(f"field 'id' must be a str or int, got {type(raw_id).__name__} {raw_id!r:.60}")
            v = header.get("v")
            if not is_int(v):
                raise BadRequest(f"field 'v' must be the int protocol version, got {v!r:.40}")
            if v != PROTOCOL_VERSION:
                raise UnsupportedVersion(f"protocol version {v} is not supported; this server speaks {PROTOCOL_VERSION}")
            raw_op = header.get("op")
            if not isinstance(raw_op, str):
                raise BadRequest(f"field 'op' must be a str, got {type(raw_op).__name__} {raw_op!r:.60}")
            if raw_op not in OPS:
                raise UnknownOp(f"op {raw_op!r:.60} is not one of {', '.join(OPS)}")
            op = raw_op
            total = sum(frame_size(f) for f in frames)
            if total > self.limits.max_message_bytes:
                raise TooLarge(f"request of {total} bytes exceeds --max-message-bytes {self.limits.max_message_bytes}")
            memory = check_memory_name(header.get("memory", DEFAULT_MEMORY))
            args = header.get("args")
            if args is None:
                args = {}
            if not isinstance(args, dict):
                raise BadRequest(f"field 'args' must be a map, got {type(args).__name__}")
            dup = self._duplicate(op, memory, req_id)
            if dup is not None:
                return self._count(dup)
            arrays = decode_arrays(header.get("arrays"), frames[1:])
        except MemoryServerError as exc:
            return self._count(Reply(req_id, op, error=exc))
        return self.execute(op, req_id, memory, args, arrays)

    def execute(self, op: str, req_id: Any, memory: str, args: dict[str, Any],
                arrays: dict[str, np.ndarray]) -> Reply:
        """Execute a request whose header fields are already parsed."""
        t0 = time.perf_counter()
        try:
            if op not in OPS:
                raise UnknownOp(f"op {op!r} is not one of {', '.join(OPS)}")
            check_memory_name(memory)
            dup = self._duplicate(op, memory, req_id)
            if dup is not None:
                return self._count(dup)
            unknown = set(args) - _ARGS.get(op, set())
            if unknown:
                raise BadRequest(f"op '{op}' does not take arg(s) {sorted(map(str, unknown))}")
            required, optional = _ARRAYS.get(op, (set(), set()))
            extra = set(arrays) - required - optional
            if extra:
                raise BadRequest(f"op '{op}' does not take array(s) {sorted(extra)}")
            if op in self.fault_ops:
                raise RuntimeError(f"injected fault in op '{op}' (--fault-internal-op)")
            reply = getattr(self, "_op_" + op)(req_id, memory, args, arrays)
        except MemoryServerError as exc:
            reply = Reply(req_id, op, error=exc)
        except FatalError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the server (PROTOCOL.md `internal`)
            log.exception("internal error in op %r (id %r)", op, req_id)
            reply = Reply(req_id, op, error=Internal(f"{type(exc).__name__} in op '{op}': {exc}"))
        if self.metrics is not None:
            self.metrics.compute.labels(op, self.metrics.device).observe(time.perf_counter() - t0)
        return self._count(reply)

    def _count(self, reply: Reply) -> Reply:
        self.requests[reply.op or "invalid"] += 1
        if reply.error is not None:
            self.errors[reply.error.code] += 1
        return reply

    def _duplicate(self, op: str, memory: str, req_id: Any) -> Reply | None:
        if op not in ("update", "put"):
            return None
        mem = self.store.memories.get(memory)
        entry = mem.window.get(req_id) if mem is not None else None
        if entry is None:
            return None
        result, arrays = entry.reply()
        return Reply(req_id, op, result=result, arrays=arrays, duplicate=True)

    def _mutate(self, effect: Any) -> None:
        """Log, then apply: a failure after logging means memory and log disagree, so stop."""
        self.durability.log(effect)
        try:
            self.store.apply(effect)
        except Exception as exc:
            raise FatalError(f"applying a logged {type(effect).__name__} failed: {exc}") from exc

    def _gauges(self, mem: Memory) -> None:
        if self.metrics is not None:
            self.metrics.set_memory(mem.name, mem.capacity, mem.filled, mem.version)

    # ---- ops ------------------------------------------------------------------------------------

    def _op_ping(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        return Reply(req_id, "ping", result={"time": time.time()})

    def _op_info(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        result: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "server": SERVER_NAME,
                                  "memories": sorted(self.store.memories)}
        mem = self.store.memories.get(memory)
        if mem is not None:
            result.update(capacity=mem.capacity, key_dim=mem.key_dim, value_dim=mem.value_dim, filled=mem.filled,
                          version=mem.version, backend=self.store.backend, durability=self.durability.cfg.mode)
        if self.metrics_port is not None:
            result["metrics_port"] = self.metrics_port
        return Reply(req_id, "info", result=result)

    def _op_create(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        capacity = _int_arg("create", args, "capacity", lo=1)
        key_dim = _int_arg("create", args, "key_dim", lo=1)
        value_dim = _int_arg("create", args, "value_dim", lo=1)
        seed = _int_arg("create", args, "seed", lo=0, required=False)
        if seed is None:
            seed = secrets.randbits(63)  # logged, so replay draws the same keys
        effect = self.store.plan_create(memory, capacity, key_dim, value_dim, seed)
        if effect is None:
            return Reply(req_id, "create", result={"version": self.store.memories[memory].version})
        self._mutate(effect)
        self._gauges(self.store.memories[memory])
        return Reply(req_id, "create", result={"version": 0}, mutated=True)

    def _op_drop(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        self.store.get(memory)
        self._mutate(DropEffect(memory))
        if self.metrics is not None:
            self.metrics.forget_memory(memory)
        # The memory's files leave the disk with the next snapshot; ask for one now.
        self.durability.request_snapshot(self.store, None)
        return Reply(req_id, "drop", result={}, mutated=True)

    def _queries(self, mem: Memory, arrays: dict, name: str = "q") -> np.ndarray:
        q = _array(arrays, name, _FLOATS, (None, mem.key_dim))
        if q.shape[0] > self.limits.max_batch:
            raise TooLarge(f"batch of {q.shape[0]} rows exceeds --max-batch {self.limits.max_batch}")
        return _unit_rows(name, q)

    def _op_query(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.get(memory)
        k = _int_arg("query", args, "k")
        if not 1 <= k <= mem.capacity:
            raise BadValue(f"arg 'k' = {k} is out of range [1, {mem.capacity}]")
        fields = args.get("fields")
        fields = [] if fields is None else fields
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise BadRequest(f"arg 'fields' must be a list of str, got {fields!r:.80}")
        unknown = [f for f in fields if f not in QUERY_FIELDS]
        if unknown:
            raise BadValue(f"arg 'fields' entry {unknown[0]!r:.40} is not one of {', '.join(QUERY_FIELDS)}")
        q_hat = self._queries(mem, arrays)
        targets = _array(arrays, "targets", _FLOATS, (q_hat.shape[0], mem.value_dim), required=False)
        log_v = rules.log_targets(_distributions("targets", targets)) if targets is not None else None
        sims, slots = mem.search(q_hat, k)
        out = [("slots", slots), ("sims", sims)]
        for f in dict.fromkeys(fields):
            out.append((f, mem.gather(f, slots)))
        if log_v is not None:
            out.append(("kl", mem.kl_matrix(slots, log_v)))
        return Reply(req_id, "query", result={"version": mem.version}, arrays=out)

    def _op_update(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.get(memory)
        threshold = _float_arg("update", args, "threshold")
        age_noise = _float_arg("update", args, "age_noise", default=0.0)
        seed = _int_arg("update", args, "seed", lo=0, required=False)
        q_hat = self._queries(mem, arrays)
        b_rows = q_hat.shape[0]
        v = _array(arrays, "v", _FLOATS, (b_rows, mem.value_dim))
        item_ids = _array(arrays, "item_ids", ("int64",), (b_rows,), required=False)
        v_norm = _distributions("v", v)
        if b_rows > mem.capacity:
            raise TooLarge(f"update of {b_rows} rows exceeds the capacity {mem.capacity} of memory {memory!r}")
        effect = mem.plan_update(q_hat, v_norm, threshold, age_noise, seed, item_ids, req_id)
        self._mutate(effect)
        if self.metrics is not None:
            self.metrics.replacements.labels(memory).inc(effect.miss_slots.size)
            self.metrics.refreshes.labels(memory).inc(effect.written_slots.size - effect.miss_slots.size)
        self._gauges(mem)
        return Reply(req_id, "update", result={"version": mem.version},
                     arrays=[("hit", effect.hit), ("slots", effect.row_slots)], mutated=True)

    def _op_get(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.get(memory)
        slots = _array(arrays, "slots", ("int64",), (None,))
        if slots.shape[0] > self.limits.max_batch:
            raise TooLarge(f"get of {slots.shape[0]} slots exceeds --max-batch {self.limits.max_batch}")
        slots = _slots("slots", slots, mem.capacity)
        out = [(f, mem.gather(f, slots)) for f in QUERY_FIELDS]
        return Reply(req_id, "get", result={"version": mem.version}, arrays=out)

    def _op_put(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.get(memory)
        slots = _array(arrays, "slots", ("int64",), (None,))
        n = slots.shape[0]
        keys = _array(arrays, "keys", _FLOATS, (n, mem.key_dim))
        values = _array(arrays, "values", _FLOATS, (n, mem.value_dim))
        ages = _array(arrays, "ages", _FLOATS, (n,), required=False)
        item_ids = _array(arrays, "item_ids", ("int64",), (n,), required=False)
        if n > self.limits.max_batch:
            raise TooLarge(f"put of {n} slots exceeds --max-batch {self.limits.max_batch}")
        _slots("slots", slots, mem.capacity)
        uniq, counts = np.unique(slots, return_counts=True)
        if (counts > 1).any():
            raise BadValue(f"array 'slots' repeats slot {int(uniq[np.argmax(counts > 1)])}; put slots must be distinct")
        keys_hat = _unit_rows("keys", keys)
        v_norm = _distributions("values", values)
        if ages is None:
            ages = np.zeros(n, np.float32)
        else:
            _check_finite("ages", ages)
            if (ages < 0).any():
                raise BadValue(f"array 'ages' entry {int(np.argmax(ages < 0))} is negative")
        if item_ids is None:
            item_ids = np.full(n, -1, np.int64)
        effect: PutEffect = mem.plan_put(slots, keys_hat, v_norm, ages, item_ids, req_id)
        self._mutate(effect)
        self._gauges(mem)
        return Reply(req_id, "put", result={"version": mem.version}, mutated=True)

    def _op_export(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.get(memory)
        return Reply(req_id, "export", result={"version": mem.version}, arrays=mem.export())

    def _op_snapshot(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        mem = self.store.memories.get(memory)
        result = {} if mem is None else {"version": mem.version}
        if not self.durability.enabled:
            result["durable"] = False
        return Reply(req_id, "snapshot", result=result, deferred=self.durability.enabled)

    def _op_stats(self, req_id: Any, memory: str, args: dict, arrays: dict) -> Reply:
        result: dict[str, Any] = {"queue_depth": self.queue_depth, "requests": dict(self.requests),
                                  "errors": dict(self.errors)}
        mem = self.store.memories.get(memory)
        if mem is not None:
            result.update(filled=mem.filled, version=mem.version, hits=mem.hits, misses=mem.misses)
        return Reply(req_id, "stats", result=result)


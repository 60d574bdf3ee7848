"""Engine: executes validated requests on the store, logs effects, remembers idempotent replies.

Transport-free: the ZeroMQ server feeds it frames (`handle_frames`), `local.InProcessMemory` calls
`execute`; both go through `requests.parse_head` and `_run`, so they share every check and message.
Validation order (which error a request with several faults gets) is: header, id, version, op, size,
memory name, idempotency, args, arrays (presence, dtype, shape, values), limits.

No exception raised while handling one request escapes: it becomes an `internal` reply with the
traceback logged, and state is as if the request never arrived. A mutation is checked completely,
then logged, then applied in two phases (allocations, then in-place writes): a failure in the first
phase removes the log record again; only a failure in the second, which writes nothing that can
fail, is a FatalError (exit 3, the log is the truth).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections import Counter as CountMap
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import requests as rq
from . import rules
from .durability import Durability, SnapshotTicket
from .effects import DropEffect, PutEffect
from .protocol import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    PROTOCOL_VERSION,
    QUERY_FIELDS,
    SERVER_NAME,
    BadRequest,
    BadValue,
    Internal,
    MemoryServerError,
    TooLarge,
    decode_arrays,
    frame_size,
    short_repr,
    unpack_header,
)
from .store import MAX_CAPACITY, EffectInvalid, Memory, MemoryStore

log = logging.getLogger(__name__)


class FatalError(RuntimeError):
    """An internal invariant broke after an effect was logged and partly applied: the process must stop."""


@dataclass
class Limits:
    """Server-wide request and memory limits (PROTOCOL.md)."""

    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_batch: int = DEFAULT_MAX_BATCH
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES


@dataclass
class Reply:
    """The outcome of one request: a result with arrays, or an error; `ticket` defers a snapshot reply."""

    req_id: Any
    op: str | None
    result: dict[str, Any] | None = None
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)
    error: MemoryServerError | None = None
    duplicate: bool = False
    ticket: SnapshotTicket | None = None
    mutated: bool = False

    @property
    def code(self) -> str:
        return "duplicate" if self.duplicate else ("ok" if self.error is None else self.error.code)

    def after_snapshot(self) -> Reply:
        """This reply once its snapshot ticket completed: unchanged if it succeeded, else `internal`."""
        if self.ticket is None or self.ticket.ok:
            return self
        return Reply(self.req_id, self.op, error=Internal(self.ticket.message or "snapshot failed"))


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
        self.fault_prepare_ops: frozenset[str] = frozenset()  # test hook: applying these fails after logging
        for mem in store.memories.values():
            self._gauges(mem)

    # ---- entry points ---------------------------------------------------------------------------

    def handle_frames(self, frames: list[Any]) -> Reply:
        """Execute one request given its frames (header first, envelope already stripped). Never raises
        except FatalError."""
        req_id: Any = None
        op: str | None = None
        try:
            if not frames:
                raise BadRequest("message has no header frame")
            header = unpack_header(frames[0], MAX_HEADER_BYTES)
            total = sum(frame_size(f) for f in frames)
            head = rq.parse_head(header, total, self.limits.max_message_bytes)
            req_id, op = head.req_id, head.op
            dup = self._duplicate(head)
            if dup is not None:
                return self.count(dup)
            arrays = decode_arrays(header.get("arrays"), frames[1:], self.limits.max_message_bytes)
        except MemoryServerError as exc:
            if hasattr(exc, "req_id"):
                req_id, op = rq.failed_id_op(exc)
            return self.count(Reply(req_id, op, error=exc))
        except Exception as exc:  # noqa: BLE001 - nothing a client sends may end the server
            return self.count(self.internal(req_id, op, exc))
        return self._run(head, arrays)

    def execute(self, op: str, req_id: Any, memory: str, args: dict[str, Any],
                arrays: dict[str, np.ndarray]) -> Reply:
        """Execute a request given as Python values (in-process path); same checks as handle_frames."""
        try:
            head = rq.parse_head({"v": PROTOCOL_VERSION, "op": op, "id": req_id, "memory": memory, "args": args})
        except MemoryServerError as exc:
            return self.count(Reply(*rq.failed_id_op(exc), error=exc))
        dup = self._duplicate(head)
        if dup is not None:
            return self.count(dup)
        return self._run(head, arrays)

    def _run(self, head: rq.Head, arrays: dict[str, np.ndarray]) -> Reply:
        t0 = time.perf_counter()
        try:
            rq.check_arg_names(head, arrays)
            if head.op in self.fault_ops:
                raise RuntimeError(f"injected fault in op '{head.op}' (--fault-internal-op)")
            reply = getattr(self, "_op_" + head.op)(head, arrays)
        except MemoryServerError as exc:
            reply = Reply(head.req_id, head.op, error=exc)
        except FatalError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not stop the server (PROTOCOL.md `internal`)
            reply = self.internal(head.req_id, head.op, exc)
        if self.metrics is not None:
            self.metrics.compute.labels(head.op, self.metrics.device).observe(time.perf_counter() - t0)
        return self.count(reply)

    def internal(self, req_id: Any, op: str | None, exc: BaseException) -> Reply:
        """The `internal` reply to a request whose handling raised `exc` (traceback logged)."""
        log.error("internal error in op %r (id %s)", op, short_repr(req_id), exc_info=exc)
        return Reply(req_id, op, error=Internal(f"{type(exc).__name__} in op '{op}': {short_repr(str(exc))}"))

    def count(self, reply: Reply) -> Reply:
        """Count a reply in `stats` (and the refusal metric of the limit that refused it, if any)."""
        self.requests[reply.op or "invalid"] += 1
        if reply.error is not None:
            self.errors[reply.error.code] += 1
            limit = getattr(reply.error, "limit", None)
            if limit and self.metrics is not None:
                self.metrics.refusals.labels(limit).inc()
        return reply

    def _duplicate(self, head: rq.Head) -> Reply | None:
        if head.op not in ("update", "put"):
            return None
        mem = self.store.memories.get(head.memory)
        entry = mem.window.get(head.req_id) if mem is not None else None
        if entry is None:
            return None
        result, arrays = entry.reply()
        return Reply(head.req_id, head.op, result=result, arrays=arrays, duplicate=True)

    def _mutate(self, effect: Any) -> None:
        """Check, log, then apply (allocations first, in-place writes last)."""
        try:
            self.store.check(effect)
        except EffectInvalid as exc:
            raise Internal(f"the planned {type(effect).__name__} is invalid (a server bug): {exc}") from exc
        mark = self.durability.log(effect)
        try:
            if type(effect).__name__.removesuffix("Effect").lower() in self.fault_prepare_ops:
                raise MemoryError("injected failure after logging (fault_prepare_ops)")
            prepared = self.store.prepare(effect)
        except Exception:
            try:
                self.durability.unlog(mark)  # as if the request never arrived
            except OSError as exc:
                raise FatalError(f"cannot remove the log record of a failed {type(effect).__name__}: {exc}") from exc
            raise
        try:
            self.store.commit(effect, prepared)
        except Exception as exc:
            raise FatalError(f"applying a logged {type(effect).__name__} failed half-way: {exc}") from exc

    def _gauges(self, mem: Memory) -> None:
        if self.metrics is not None:
            self.metrics.set_memory(mem.name, mem.capacity, mem.filled, mem.version, mem.nbytes())
            self.metrics.set_store(len(self.store.memories), self.store.total_nbytes(), self.store.window_evictions)

    # ---- ops ------------------------------------------------------------------------------------

    def _op_ping(self, head: rq.Head, arrays: dict) -> Reply:
        return Reply(head.req_id, "ping", result={"time": time.time()})

    def _op_info(self, head: rq.Head, arrays: dict) -> Reply:
        result: dict[str, Any] = {"protocol": PROTOCOL_VERSION, "server": SERVER_NAME,
                                  "memories": sorted(self.store.memories),
                                  "max_message_bytes": self.limits.max_message_bytes,
                                  "max_batch": self.limits.max_batch}
        mem = self.store.memories.get(head.memory)
        if mem is not None:
            result.update(capacity=mem.capacity, key_dim=mem.key_dim, value_dim=mem.value_dim, filled=mem.filled,
                          version=mem.version, backend=self.store.backend, durability=self.durability.cfg.mode,
                          nbytes=mem.nbytes(), index=self.store.index.index, key_dtype=self.store.index.key_dtype,
                          value_dtype=mem.values.dtype.name)
        if self.metrics_port is not None:
            result["metrics_port"] = self.metrics_port
        return Reply(head.req_id, "info", result=result)

    def _op_create(self, head: rq.Head, arrays: dict) -> Reply:
        args = head.args
        capacity = rq.int_arg("create", args, "capacity", lo=1, hi=MAX_CAPACITY)
        key_dim = rq.int_arg("create", args, "key_dim", lo=1, hi=MAX_CAPACITY)
        value_dim = rq.int_arg("create", args, "value_dim", lo=1, hi=MAX_CAPACITY)
        seed = rq.int_arg("create", args, "seed", lo=0, hi=2**63 - 1, required=False)
        if seed is None:
            seed = secrets.randbits(63)  # logged, so replay draws the same keys
        effect = self.store.plan_create(head.memory, capacity, key_dim, value_dim, seed)
        if effect is None:
            return Reply(head.req_id, "create", result={"version": self.store.memories[head.memory].version})
        self._mutate(effect)
        self._gauges(self.store.memories[head.memory])
        return Reply(head.req_id, "create", result={"version": 0}, mutated=True)

    def _op_drop(self, head: rq.Head, arrays: dict) -> Reply:
        self.store.get(head.memory)
        self._mutate(DropEffect(head.memory))
        if self.metrics is not None:
            self.metrics.forget_memory(head.memory)
            self.metrics.set_store(len(self.store.memories), self.store.total_nbytes(), self.store.window_evictions)
        # The memory's bytes leave the disk with the next snapshot; ask for one (never fails the drop).
        self.durability.schedule_snapshot()
        return Reply(head.req_id, "drop", result={}, mutated=True)

    def _queries(self, mem: Memory, arrays: dict, name: str = "q") -> np.ndarray:
        q = rq.array(arrays, name, rq.FLOATS, (None, mem.key_dim))
        if q.shape[0] > self.limits.max_batch:
            raise TooLarge(f"batch of {q.shape[0]} rows exceeds --max-batch {self.limits.max_batch}", limit="batch")
        return rq.unit_rows(name, q)

    def _op_query(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.get(head.memory)
        k = rq.int_arg("query", head.args, "k")
        if not 1 <= k <= mem.capacity:
            raise BadValue(f"arg 'k' = {short_repr(k)} is out of range [1, {mem.capacity}]")
        fields = head.args.get("fields")
        fields = [] if fields is None else fields
        if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
            raise BadRequest(f"arg 'fields' must be a list of str, got {short_repr(fields)}")
        unknown = [f for f in fields if f not in QUERY_FIELDS]
        if unknown:
            raise BadValue(f"arg 'fields' entry {short_repr(unknown[0])} is not one of {', '.join(QUERY_FIELDS)}")
        fields = list(dict.fromkeys(fields))
        q_hat = self._queries(mem, arrays)
        targets = rq.array(arrays, "targets", rq.FLOATS, (q_hat.shape[0], mem.value_dim), required=False)
        per_slot = 8 + 4 + (4 if targets is not None else 0) + mem.row_bytes(fields)
        rq.check_reply_size("query", q_hat.shape[0] * k * per_slot, self.limits.max_message_bytes)
        log_v = rules.log_targets(rq.distributions("targets", targets)) if targets is not None else None
        sims, slots = mem.search(q_hat, k)
        out = [("slots", slots), ("sims", sims)]
        for f in fields:
            out.append((f, mem.gather(f, slots)))
        if log_v is not None:
            out.append(("kl", mem.kl_matrix(slots, log_v)))
        return Reply(head.req_id, "query", result={"version": mem.version}, arrays=out)

    def _op_update(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.get(head.memory)
        threshold = rq.float_arg("update", head.args, "threshold")
        age_noise = rq.float_arg("update", head.args, "age_noise", default=0.0)
        seed = rq.int_arg("update", head.args, "seed", lo=0, hi=2**63 - 1, required=False)
        q_hat = self._queries(mem, arrays)
        b_rows = q_hat.shape[0]
        v = rq.array(arrays, "v", rq.FLOATS, (b_rows, mem.value_dim))
        item_ids = rq.array(arrays, "item_ids", ("int64",), (b_rows,), required=False)
        v_norm = rq.distributions("v", v)
        if b_rows > mem.capacity:
            raise TooLarge(f"update of {b_rows} rows exceeds the capacity {mem.capacity} of memory {head.memory!r}",
                           limit="capacity")
        effect = mem.plan_update(q_hat, v_norm, threshold, age_noise, seed, item_ids, head.req_id)
        self._mutate(effect)
        if self.metrics is not None:
            self.metrics.replacements.labels(head.memory).inc(effect.miss_slots.size)
            self.metrics.refreshes.labels(head.memory).inc(effect.written_slots.size - effect.miss_slots.size)
        self._gauges(mem)
        return Reply(head.req_id, "update", result={"version": mem.version},
                     arrays=[("hit", effect.hit), ("slots", effect.row_slots)], mutated=True)

    def _op_get(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.get(head.memory)
        slots = rq.array(arrays, "slots", ("int64",), (None,))
        if slots.shape[0] > self.limits.max_batch:
            raise TooLarge(f"get of {slots.shape[0]} slots exceeds --max-batch {self.limits.max_batch}", limit="batch")
        slots = rq.slots("slots", slots, mem.capacity)
        rq.check_reply_size("get", slots.shape[0] * mem.row_bytes(QUERY_FIELDS), self.limits.max_message_bytes)
        out = [(f, mem.gather(f, slots)) for f in QUERY_FIELDS]
        return Reply(head.req_id, "get", result={"version": mem.version}, arrays=out)

    def _op_put(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.get(head.memory)
        slots = rq.array(arrays, "slots", ("int64",), (None,))
        n = slots.shape[0]
        keys = rq.array(arrays, "keys", rq.FLOATS, (n, mem.key_dim))
        values = rq.array(arrays, "values", rq.FLOATS, (n, mem.value_dim))
        ages = rq.array(arrays, "ages", rq.FLOATS, (n,), required=False)
        item_ids = rq.array(arrays, "item_ids", ("int64",), (n,), required=False)
        if n > self.limits.max_batch:
            raise TooLarge(f"put of {n} slots exceeds --max-batch {self.limits.max_batch}", limit="batch")
        rq.slots("slots", slots, mem.capacity)
        uniq, counts = np.unique(slots, return_counts=True)
        if (counts > 1).any():
            raise BadValue(f"array 'slots' repeats slot {int(uniq[np.argmax(counts > 1)])}; put slots must be distinct")
        keys_hat = rq.unit_rows("keys", keys)
        v_norm = rq.distributions("values", values)
        if ages is None:
            ages = np.zeros(n, np.float32)
        else:
            rq.check_finite("ages", ages)
            if (ages < 0).any():
                raise BadValue(f"array 'ages' entry {int(np.argmax(ages < 0))} is negative")
        if item_ids is None:
            item_ids = np.full(n, -1, np.int64)
        effect: PutEffect = mem.plan_put(slots, keys_hat, v_norm, ages, item_ids, head.req_id)
        self._mutate(effect)
        self._gauges(mem)
        return Reply(head.req_id, "put", result={"version": mem.version}, mutated=True)

    def _op_export(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.get(head.memory)
        rq.check_reply_size("export", mem.capacity * mem.row_bytes(QUERY_FIELDS), self.limits.max_message_bytes)
        return Reply(head.req_id, "export", result={"version": mem.version}, arrays=mem.export())

    def _op_snapshot(self, head: rq.Head, arrays: dict) -> Reply:
        mem = self.store.memories.get(head.memory)
        result = {} if mem is None else {"version": mem.version}
        if not self.durability.enabled:
            result["durable"] = False
            return Reply(head.req_id, "snapshot", result=result)
        return Reply(head.req_id, "snapshot", result=result, ticket=self.durability.request_snapshot(self.store))

    def _op_stats(self, head: rq.Head, arrays: dict) -> Reply:
        result: dict[str, Any] = {"queue_depth": self.queue_depth, "requests": dict(self.requests),
                                  "errors": dict(self.errors), "memory_bytes": self.store.total_nbytes(),
                                  "window_evictions": self.store.window_evictions,
                                  "snapshot_failures": self.durability.failures_total}
        mem = self.store.memories.get(head.memory)
        if mem is not None:
            result.update(filled=mem.filled, version=mem.version, hits=mem.hits, misses=mem.misses)
        return Reply(head.req_id, "stats", result=result)


"""MemoryClient: numpy in and out over a DEALER socket, one method per op of PROTOCOL.md.

Every call has a deadline: each attempt waits `timeout_ms`, a timed-out attempt closes the socket
(Lazy Pirate) and resends the same request id on a fresh one, at most `retries` times, so an update
retried after a lost reply is answered from the server's idempotency window instead of applied twice.
`busy` replies are retried with exponential backoff (5 ms doubling to 500 ms) within the same total
budget, (retries + 1) * timeout_ms. Reconnection after a server restart is automatic. Never hangs.

`update_async` / `query_async` send without waiting and return a PendingReply, collected later with
`.result()` (the same retries, deadline and errors as the blocking call). At most one request is in
flight per client: any later call first collects the pending one, so requests take effect in the order
they were made even when the server answers `busy`, and an in-flight error surfaces at the latest on
the next call, after waiting no longer than that request's own deadline.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth

from .protocol import (
    DEFAULT_MEMORY,
    BadDtype,
    BadRequest,
    BadShape,
    BadValue,
    Busy,
    Exists,
    Internal,
    MemoryServerError,
    NoSuchMemory,
    TooLarge,
    UnknownOp,
    UnsupportedVersion,
    decode_arrays,
    encode_frames,
    error_from_code,
    id_problem,
    request_header,
    short_repr,
    unpack_header,
    valid_request_id,
    wire_array,
)

__all__ = [
    "MemoryClient", "MemoryUnavailable", "PendingReply", "CurveKeys", "MemoryServerError", "BadRequest", "UnsupportedVersion",
    "UnknownOp", "NoSuchMemory", "Exists", "BadShape", "BadDtype", "BadValue", "TooLarge", "Busy", "Internal",
]

_BUSY_BACKOFF_S = (0.005, 0.5)


class MemoryUnavailable(Exception):
    """No reply from the server within the call's retry budget."""


@dataclass(frozen=True)
class CurveKeys:
    """CURVE keys of a client: the server's public key and the client's key pair (z85 bytes)."""

    server_public: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def from_files(cls, server_public_file: str | Path, client_secret_file: str | Path) -> CurveKeys:
        """Load zmq.auth certificate files (`server.key`, `client.key_secret`)."""
        server_public, _ = zmq.auth.load_certificate(str(server_public_file))
        client_public, client_secret = zmq.auth.load_certificate(str(client_secret_file))
        if not client_secret:
            raise ValueError(f"{client_secret_file} holds no secret key")
        return cls(server_public, client_public, client_secret)


def _floats(x: Any) -> np.ndarray:
    a = np.asarray(x)
    return a if a.dtype in (np.float32, np.float16) else a.astype(np.float32)


def _ints(x: Any, name: str) -> np.ndarray:
    """int64 slots or item ids; floats (or anything else) are refused, never truncated."""
    a = np.asarray(x)
    if a.size == 0 and a.dtype.kind == "f":
        return a.astype(np.int64)  # np.asarray([]) is float64; an empty list is fine
    if a.dtype.kind not in "iu":
        raise BadDtype(f"array '{name}' must hold integers, got {a.dtype} {short_repr(a.reshape(-1)[:6].tolist())}")
    if a.dtype.kind == "u" and a.size and int(a.max()) > np.iinfo(np.int64).max:
        raise BadValue(f"array '{name}' holds {int(a.max())}, beyond int64")
    return a.astype(np.int64, copy=False)


def _query_request(q, k, targets, fields) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    args: dict[str, Any] = {"k": int(k)}
    if fields:
        args["fields"] = list(fields)
    arrays = [("q", _floats(q))]
    if targets is not None:
        arrays.append(("targets", _floats(targets)))
    return args, arrays


def _update_request(q, v, threshold, age_noise, seed, item_ids) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    args: dict[str, Any] = {"threshold": float(threshold), "age_noise": float(age_noise)}
    if seed is not None:
        args["seed"] = int(seed)
    arrays = [("q", _floats(q)), ("v", _floats(v))]
    if item_ids is not None:
        arrays.append(("item_ids", _ints(item_ids, "item_ids")))
    return args, arrays


class PendingReply:
    """The reply to a request sent without waiting; `result()` returns it or raises its error (once
    collected, the same value or error on every later call)."""

    def __init__(self, collect=None) -> None:
        self._collect = collect
        self._value: dict[str, Any] | None = None
        self._error: BaseException | None = None

    @classmethod
    def done(cls, value: dict[str, Any] | None = None, error: BaseException | None = None) -> PendingReply:
        pending = cls()
        pending._value, pending._error = value, error
        return pending

    @property
    def collected(self) -> bool:
        return self._collect is None

    def result(self) -> dict[str, Any]:
        if self._collect is not None:
            collect, self._collect = self._collect, None
            try:
                self._value = collect()
            except BaseException as exc:  # kept, so a second result() raises the same error
                self._error = exc
        if self._error is not None:
            raise self._error
        return self._value


class MemoryApi:
    """The op methods shared by MemoryClient and local.InProcessMemory; subclasses implement `_call`."""

    memory: str = DEFAULT_MEMORY

    def _call(self, op: str, args: dict[str, Any] | None, arrays: Sequence[tuple[str, np.ndarray]],
              memory: str | None, req_id: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        raise NotImplementedError

    def _result(self, op: str, args: dict | None = None, arrays: Sequence = (), memory: str | None = None,
                req_id: Any = None) -> dict[str, Any]:
        result, out = self._call(op, args, arrays, memory if memory is not None else self.memory, req_id)
        return {**out, **result}

    def ping(self) -> dict[str, Any]:
        """{'time': server wall clock}."""
        return self._result("ping")

    def info(self, memory: str | None = None) -> dict[str, Any]:
        """Server and memory description (PROTOCOL.md `info`)."""
        return self._result("info", memory=memory)

    def create(self, capacity: int, key_dim: int, value_dim: int, seed: int | None = None,
               memory: str | None = None) -> dict[str, Any]:
        """Create the memory (idempotent for the same shape); {'version'}."""
        args = {"capacity": int(capacity), "key_dim": int(key_dim), "value_dim": int(value_dim)}
        if seed is not None:
            args["seed"] = int(seed)
        return self._result("create", args, memory=memory)

    def drop(self, memory: str | None = None) -> dict[str, Any]:
        """Remove the memory and its files."""
        return self._result("drop", memory=memory)

    def query(self, q: np.ndarray, k: int, targets: np.ndarray | None = None, fields: Sequence[str] = (),
              memory: str | None = None) -> dict[str, Any]:
        """Top-k: 'slots' [B,k] i64, 'sims' [B,k] f32, each field gathered, 'kl' [B,k] with targets, 'version'."""
        args, arrays = _query_request(q, k, targets, fields)
        return self._result("query", args, arrays, memory)

    def update(self, q: np.ndarray, v: np.ndarray, threshold: float, age_noise: float = 0.0,
               seed: int | None = None, item_ids: np.ndarray | None = None, memory: str | None = None,
               request_id: str | int | None = None) -> dict[str, Any]:
        """Apply the update rule: 'hit' [B] bool, 'slots' [B] i64, 'version'. `request_id` = idempotency key."""
        args, arrays = _update_request(q, v, threshold, age_noise, seed, item_ids)
        return self._result("update", args, arrays, memory, request_id)

    def _start(self, op: str, args: dict | None, arrays: Sequence, memory: str | None, req_id: Any = None
               ) -> PendingReply:
        """Begin a call; the base class runs it at once (an in-process engine has nothing to overlap)."""
        try:
            return PendingReply.done(self._result(op, args, arrays, memory, req_id))
        except MemoryServerError as exc:
            return PendingReply.done(error=exc)

    def query_async(self, q: np.ndarray, k: int, targets: np.ndarray | None = None, fields: Sequence[str] = (),
                    memory: str | None = None) -> PendingReply:
        """`query` without waiting: `.result()` of the returned PendingReply is query's return value."""
        args, arrays = _query_request(q, k, targets, fields)
        return self._start("query", args, arrays, memory if memory is not None else self.memory)

    def update_async(self, q: np.ndarray, v: np.ndarray, threshold: float, age_noise: float = 0.0,
                     seed: int | None = None, item_ids: np.ndarray | None = None, memory: str | None = None,
                     request_id: str | int | None = None) -> PendingReply:
        """`update` without waiting: `.result()` of the returned PendingReply is update's return value."""
        args, arrays = _update_request(q, v, threshold, age_noise, seed, item_ids)
        return self._start("update", args, arrays, memory if memory is not None else self.memory, request_id)

    def get(self, slots: np.ndarray, memory: str | None = None) -> dict[str, Any]:
        """'keys', 'values', 'ages', 'item_ids' at `slots`, and 'version'."""
        return self._result("get", None, [("slots", _ints(slots, "slots"))], memory)

    def put(self, slots: np.ndarray, keys: np.ndarray, values: np.ndarray, ages: np.ndarray | None = None,
            item_ids: np.ndarray | None = None, memory: str | None = None,
            request_id: str | int | None = None) -> dict[str, Any]:
        """Overwrite distinct slots (keys and values normalised by the server); {'version'}."""
        arrays = [("slots", _ints(slots, "slots")), ("keys", _floats(keys)), ("values", _floats(values))]
        if ages is not None:
            arrays.append(("ages", _floats(ages)))
        if item_ids is not None:
            arrays.append(("item_ids", _ints(item_ids, "item_ids")))
        return self._result("put", None, arrays, memory, request_id)

    def export(self, memory: str | None = None) -> dict[str, Any]:
        """The whole memory: 'keys', 'values', 'ages', 'item_ids', 'version'.

        A memory whose export would exceed the server's --max-message-bytes (`too_large`) is read with
        `get` in chunks instead, all at one version (re-read if an update lands in between).
        """
        try:
            return self._result("export", memory=memory)
        except TooLarge:
            return self._export_in_chunks(memory)

    def _export_in_chunks(self, memory: str | None, attempts: int = 5) -> dict[str, Any]:
        info = self.info(memory=memory)
        m, rows = info["capacity"], rows_per_get(info)
        for _ in range(attempts):
            parts = [self.get(np.arange(s, min(m, s + rows)), memory=memory) for s in range(0, m, rows)]
            versions = {p["version"] for p in parts}
            if len(versions) == 1:
                out = {k: np.concatenate([p[k] for p in parts]) for k in ("keys", "values", "ages", "item_ids")}
                return {**out, "version": versions.pop()}
        raise Busy(f"export of memory {memory or self.memory!r} in chunks: the memory changed during each of "
                   f"{attempts} attempts")

    def snapshot(self, memory: str | None = None) -> dict[str, Any]:
        """Returns once every memory is durable in a snapshot; {'version'} of the named memory."""
        return self._result("snapshot", memory=memory)

    def stats(self, memory: str | None = None) -> dict[str, Any]:
        """Counters: filled, version, hits, misses, queue_depth, requests, errors."""
        return self._result("stats", memory=memory)


class MemoryClient(MemoryApi):
    """A DEALER-socket client of one memory server (not thread-safe: one per thread)."""

    def __init__(self, endpoint: str, timeout_ms: int = 5000, retries: int = 3, curve: CurveKeys | None = None,
                 memory: str = DEFAULT_MEMORY) -> None:
        if timeout_ms <= 0 or retries < 0:
            raise ValueError(f"timeout_ms must be > 0 and retries >= 0, got {timeout_ms}, {retries}")
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.curve = curve
        self.memory = memory
        self._ctx = zmq.Context()
        self._sock: zmq.Socket | None = None
        self._prefix = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self.last_request_id: Any = None
        self.busy_retries = 0  # busy replies retried so far (for the caller's metrics)
        self.timeouts = 0  # attempts that timed out and were resent
        self._pending: PendingReply | None = None  # the request sent without waiting, not yet collected

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
        if self.curve is not None:
            sock.curve_serverkey = self.curve.server_public
            sock.curve_publickey = self.curve.client_public
            sock.curve_secretkey = self.curve.client_secret
        if self.endpoint.startswith("tcp://[") or self.endpoint.count(":") > 2:
            sock.setsockopt(zmq.IPV6, 1)
        sock.connect(self.endpoint)
        self._sock = sock
        return sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def _await(self, req_id: Any, deadline: float) -> tuple[dict[str, Any], list[Any]] | None:
        sock = self._sock
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not sock.poll(left_ms, zmq.POLLIN):
                return None
            frames = sock.recv_multipart(copy=False)
            try:
                header = unpack_header(frames[0])
            except MemoryServerError:
                continue
            if header.get("id") == req_id and type(header.get("id")) is type(req_id):
                return header, frames[1:]
            # A late reply to an earlier request on this socket: ignore it.

    def _call(self, op: str, args: dict[str, Any] | None, arrays: Sequence[tuple[str, np.ndarray]],
              memory: str | None, req_id: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return self._send(op, args, arrays, memory, req_id)()

    def _start(self, op: str, args: dict | None, arrays: Sequence, memory: str | None, req_id: Any = None
               ) -> PendingReply:
        collect = self._send(op, args, arrays, memory, req_id)
        pending = PendingReply(lambda: _merge(*collect()))
        self._pending = pending
        return pending

    def collect_pending(self) -> None:
        """Wait for the request still in flight, if any (its error, if any, is raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.collected:  # an error the caller already collected stays theirs
            pending.result()

    def _send(self, op: str, args: dict[str, Any] | None, arrays: Sequence[tuple[str, np.ndarray]],
              memory: str | None, req_id: Any = None):
        """Send the first attempt now; returns the function that waits for (and retries) the reply."""
        if self._ctx is None:
            raise MemoryUnavailable(f"client for {self.endpoint} is closed")
        # One request in flight: the previous one completes (or raises) before this one is sent, so a
        # `busy` retry of an earlier update can never land behind a later query.
        self.collect_pending()
        req_id = f"{self._prefix}-{next(self._ids)}" if req_id is None else req_id
        if not valid_request_id(req_id):
            # The server could not echo such an id, so its error reply would never match: refuse it here.
            raise BadRequest(f"request_id must be an int64 or a str of at most 256 UTF-8 bytes, got "
                             f"{id_problem(req_id)}")
        self.last_request_id = req_id
        frames = encode_frames(request_header(op, req_id, memory, args), arrays)
        t0 = time.monotonic()
        budget_end = t0 + (self.retries + 1) * self.timeout_ms / 1000
        sent = self._send_attempt(frames)
        return lambda: self._collect(op, req_id, frames, t0, budget_end, sent)

    def _send_attempt(self, frames) -> float | None:
        """Send once; the attempt's start time, or None when the send itself timed out."""
        sock = self._sock or self._connect()
        try:
            sock.send_multipart(frames, copy=False)
        except zmq.Again:
            return None
        return time.monotonic()

    def _collect(self, op: str, req_id: Any, frames, t0: float, budget_end: float, sent: float | None
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        timeouts = 0
        backoff = _BUSY_BACKOFF_S[0]
        while True:
            got = None
            if sent is not None:
                got = self._await(req_id, min(sent + self.timeout_ms / 1000, budget_end + 0.001))
            if got is None:
                timeouts += 1
                self.timeouts += 1
                self._reset()  # Lazy Pirate: drop queued frames and any half-open connection
                if timeouts > self.retries or time.monotonic() >= budget_end:
                    raise MemoryUnavailable(
                        f"no reply from {self.endpoint} to '{op}' (id {req_id!r}) after {timeouts} attempt(s) "
                        f"in {time.monotonic() - t0:.2f} s (timeout_ms={self.timeout_ms}, retries={self.retries})"
                    )
                sent = self._send_attempt(frames)
                continue
            header, array_frames = got
            if header.get("ok") is True:
                result = header.get("result") or {}
                return result, decode_arrays(header.get("arrays"), array_frames)
            err = header.get("error") or {}
            exc = error_from_code(str(err.get("code", "internal")), str(err.get("message", "")))
            if op == "drop" and timeouts and isinstance(exc, NoSuchMemory):
                # A resent drop: the lost first reply most likely was this very drop succeeding, and
                # either way the memory is gone, which is what the caller asked for.
                return {}, {}
            if isinstance(exc, Busy):
                left = budget_end - time.monotonic()
                if left > backoff:
                    self.busy_retries += 1
                    time.sleep(backoff)
                    backoff = min(2 * backoff, _BUSY_BACKOFF_S[1])
                    sent = self._send_attempt(frames)
                    continue
            raise exc

    def close(self) -> None:
        """Close the socket (linger 0) and the context; later calls raise MemoryUnavailable. A request
        still in flight is abandoned (collect it first to know its outcome)."""
        self._pending = None
        self._reset()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown may have torn zmq down already
            pass


def rows_per_get(info: dict[str, Any]) -> int:
    """Slots one `get` of the memory `info` describes may ask for within the server's --max-batch and
    --max-message-bytes (with room for the header)."""
    row = 4 * info["key_dim"] + 4 * info["value_dim"] + 12  # keys, values (float32), age, item id
    return max(1, min(info.get("max_batch", 65_536), (info.get("max_message_bytes", 1 << 20) - 4096) // row))


def _merge(result: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return {**arrays, **result}


def as_wire_arrays(arrays: Sequence[tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """What the server would decode from these arrays: little-endian C-contiguous, by name."""
    return {name: wire_array(a) for name, a in arrays}

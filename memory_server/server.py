"""The ZeroMQ ROUTER loop: admit or refuse (busy), execute in order, group-commit, reply.

One thread (the main thread) owns the socket and the store. Each turn it drains the socket into a
bounded queue (requests beyond --max-queue get `busy` at once), executes queued requests in arrival
order, fsyncs the log once for the group (`always`), then sends the group's replies. Sends never
block: with ROUTER_MANDATORY an unroutable or full peer raises, and the reply is dropped and counted
(the client's retry then gets the idempotent reply).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from .engine import Engine, Reply
from .protocol import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    OPS,
    Busy,
    Internal,
    encode_frames,
    error_header,
    frame_size,
    ok_header,
    valid_request_id,
)

log = logging.getLogger(__name__)

POLL_MS = 100
CHILD_POLL_MS = 5
GROUP_MAX = 64  # requests executed per fsync group


class BindRefused(ValueError):
    """The bind endpoint is not allowed (non-loopback without CURVE or --insecure) or malformed."""


@dataclass
class ServerConfig:
    """Transport settings of the server."""

    bind: str = DEFAULT_ENDPOINT
    max_queue: int = 64
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    curve_secret_key: Path | None = None
    curve_clients: Path | None = None
    insecure: bool = False
    linger_ms: int = 2000


def split_tcp(endpoint: str) -> tuple[str, str]:
    """(host, port) of a tcp:// endpoint; BindRefused if it has no port."""
    host, sep, port = endpoint[len("tcp://"):].rpartition(":")
    if not sep or not host:
        raise BindRefused(f"endpoint {endpoint!r} must look like tcp://HOST:PORT")
    return host, port


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address (or a name resolving only to one)."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = split_tcp(endpoint)[0].strip("[]")
    if host in ("*", "0.0.0.0", "::"):
        return False
    if host in ("localhost", "lo"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def zmq_bind_endpoint(endpoint: str) -> tuple[str, bool]:
    """(endpoint for zmq bind, needs IPv6); port 0 becomes zmq's wildcard port."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return endpoint, False
    if not endpoint.startswith("tcp://"):
        raise BindRefused(f"endpoint {endpoint!r}: use tcp://HOST:PORT or ipc://PATH")
    host, port = split_tcp(endpoint)
    if port == "0":
        port = "*"
    elif port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
        raise BindRefused(f"endpoint {endpoint!r}: port {port!r} is not 0..65535")
    return f"tcp://{host}:{port}", host.startswith("[") or host.count(":") > 1


def check_bind_policy(cfg: ServerConfig) -> None:
    """Refuse a non-loopback bind unless CURVE is configured or --insecure is given."""
    if bool(cfg.curve_secret_key) != bool(cfg.curve_clients):
        raise BindRefused("CURVE needs both --curve-secret-key FILE and --curve-clients DIR")
    zmq_bind_endpoint(cfg.bind)
    if not is_loopback_endpoint(cfg.bind) and not cfg.curve_secret_key and not cfg.insecure:
        raise BindRefused(
            f"refusing to bind non-loopback endpoint {cfg.bind}: configure CURVE (--curve-secret-key FILE "
            f"--curve-clients DIR) or pass --insecure"
        )


@dataclass
class _Pending:
    envelope: list[Any]
    body: list[Any]
    t_recv: float
    nbytes: int


class Server:
    """ROUTER socket + bounded queue in front of an Engine."""

    def __init__(self, engine: Engine, cfg: ServerConfig, metrics: Any = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.router: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.queue: deque[_Pending] = deque()
        self.stopping = False
        self.endpoint: str | None = None

    def bind(self) -> str:
        """Configure security and bind; returns the resolved endpoint."""
        check_bind_policy(self.cfg)
        endpoint, ipv6 = zmq_bind_endpoint(self.cfg.bind)
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_bytes)
        router.setsockopt(zmq.LINGER, self.cfg.linger_ms)
        router.setsockopt(zmq.SNDHWM, 10_000)
        router.setsockopt(zmq.RCVHWM, 10_000)
        if ipv6:
            router.setsockopt(zmq.IPV6, 1)
        if self.cfg.curve_secret_key:
            public, secret = zmq.auth.load_certificate(str(self.cfg.curve_secret_key))
            if not secret:
                raise BindRefused(f"{self.cfg.curve_secret_key} holds no secret key (use the .key_secret file)")
            if not Path(self.cfg.curve_clients).is_dir():
                raise BindRefused(f"--curve-clients {self.cfg.curve_clients} is not a directory")
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=str(self.cfg.curve_clients))
            router.curve_secretkey = secret
            router.curve_publickey = public
            router.curve_server = True
        try:
            router.bind(endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            raise BindRefused(f"cannot bind {self.cfg.bind}: {exc}") from exc
        self.router = router
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    # ---- the loop -------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until `stopping` is set (signal handler); then finish and snapshot."""
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while not self.stopping:
            waiting = self.engine.durability.child is not None  # reap a snapshot child promptly
            events = dict(poller.poll(0 if self.queue else (CHILD_POLL_MS if waiting else POLL_MS)))
            if self.monitor in events:
                self._drain_monitor()
            self._admit()
            self._process_group()
            for token, ok, message in self.engine.durability.poll(self.engine.store):
                self._snapshot_done(token, ok, message)
        self._shutdown()

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if self.metrics is not None:
                if msg["event"] == zmq.EVENT_ACCEPTED:
                    self.metrics.clients.inc()
                elif msg["event"] == zmq.EVENT_DISCONNECTED:
                    self.metrics.clients.dec()

    def _admit(self) -> None:
        # Bounded, so a flood of refused requests cannot starve the queue.
        for _ in range(max(256, 4 * self.cfg.max_queue)):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            now = time.perf_counter()
            identity, rest = frames[0], frames[1:]
            delimited = bool(rest) and len(rest[0]) == 0  # REQ clients send an empty delimiter first
            envelope = [identity, b""] if delimited else [identity]
            item = _Pending(envelope, rest[1:] if delimited else rest, now, sum(frame_size(f) for f in rest))
            if len(self.queue) >= self.cfg.max_queue:
                self._refuse_busy(item)
            else:
                self.queue.append(item)
        self._set_depth()

    def _set_depth(self) -> None:
        self.engine.queue_depth = len(self.queue)
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))

    def _peek(self, item: _Pending) -> tuple[Any, str | None]:
        try:
            header = msgpack.unpackb(item.body[0], raw=False, strict_map_key=False)
        except (msgpack.UnpackException, ValueError, TypeError, IndexError):
            return None, None
        if not isinstance(header, dict):
            return None, None
        op = header.get("op") if isinstance(header.get("op"), str) else None
        return (header.get("id") if valid_request_id(header.get("id")) else None), op

    def _refuse_busy(self, item: _Pending) -> None:
        req_id, op = self._peek(item)
        self.engine.errors["busy"] += 1
        if self.metrics is not None:
            self.metrics.busy.inc()
            self.metrics.started.labels(op if op in OPS else "invalid").inc()
        exc = Busy(f"queue full ({self.cfg.max_queue} requests waiting, --max-queue); retry later")
        self._send(item, Reply(req_id, op if op in OPS else None, error=exc))

    def _process_group(self) -> None:
        held: list[tuple[_Pending, Reply]] = []
        for _ in range(GROUP_MAX):
            if not self.queue or self.stopping:
                break
            item = self.queue.popleft()
            self._set_depth()
            reply = self.engine.handle_frames(item.body)
            if self.metrics is not None:
                self.metrics.started.labels(reply.op or "invalid").inc()
                self.metrics.request_bytes.labels(reply.op or "invalid").inc(item.nbytes)
            if reply.deferred:
                for token, ok, message in self.engine.durability.request_snapshot(self.engine.store, (item, reply)):
                    self._snapshot_done(token, ok, message)
            elif self.engine.durability.dirty or held:
                held.append((item, reply))  # it may have read state that is not durable yet
            else:
                self._send(item, reply)
            self._admit()
        if held:
            self.engine.durability.commit()
            for item, reply in held:
                self._send(item, reply)

    def _snapshot_done(self, token: Any, ok: bool, message: str) -> None:
        if token is None:
            return
        item, reply = token
        if not ok:
            reply = Reply(reply.req_id, reply.op, error=Internal(message or "snapshot failed"))
        self._send(item, reply)

    def _send(self, item: _Pending, reply: Reply) -> None:
        if reply.error is None:
            frames = encode_frames(ok_header(reply.req_id, reply.result or {}), reply.arrays)
        else:
            frames = encode_frames(error_header(reply.req_id, reply.error.code, reply.error.message))
        try:
            self.router.send_multipart(item.envelope + frames, zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:
            if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                raise
            log.debug("reply to a gone or slow peer dropped: %s", exc)
            if self.metrics is not None:
                self.metrics.dropped_replies.inc()
        if self.metrics is not None:
            op = reply.op or "invalid"
            self.metrics.handled.labels(op, reply.code).inc()
            self.metrics.duration.labels(op).observe(time.perf_counter() - item.t_recv)
            self.metrics.response_bytes.labels(op).inc(sum(frame_size(f) for f in frames))

    # ---- stopping -------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Refuse what is queued, finish the running snapshot, write a final one, flush replies."""
        while self.queue:
            item = self.queue.popleft()
            req_id, op = self._peek(item)
            self._send(item, Reply(req_id, op if op in OPS else None,
                                   error=Busy("server is shutting down; retry later")))
        self._set_depth()
        for token, ok, message in self.engine.durability.close(self.engine.store, final_snapshot=True):
            self._snapshot_done(token, ok, message)
        self.close()

    def close(self, linger_ms: int | None = None) -> None:
        """Close sockets (waiting up to linger for replies to leave) and the authenticator."""
        if self.monitor is not None:
            self.router.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        if self.router is not None:
            self.router.close(self.cfg.linger_ms if linger_ms is None else linger_ms)
            self.router = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.ctx.term()

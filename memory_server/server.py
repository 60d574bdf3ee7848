"""The ZeroMQ ROUTER loop: admit or refuse, execute in order, group-commit, reply.

One thread (the main thread) owns the socket and the store. Each turn it receives whole requests frame
by frame (frames past --max-message-bytes are released at once and the request gets `too_large`),
admits them into a queue bounded in count (--max-queue) and bytes (--max-queue-bytes), refusing the
rest `busy`, executes queued requests in arrival order, fsyncs the log once for the group (`always`),
then sends the group's replies through the Outbox, which bounds what waits for slow peers
(--max-send-bytes). Nothing one request does ends the loop: the engine turns any exception into an
`internal` reply; only FatalError (an invariant broken after logging) or a failed fsync stop it (exit 3).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from . import requests as rq
from .engine import Engine, FatalError, Reply
from .outbox import Outbox
from .protocol import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_HEADER_BYTES,
    Busy,
    MemoryServerError,
    TooLarge,
    encode_frames,
    error_header,
    frame_size,
    ok_header,
    unpack_header,
)

log = logging.getLogger(__name__)

POLL_MS = 100
CHILD_POLL_MS = 5
GROUP_MAX = 64  # requests executed per fsync group
SNDHWM = 1  # replies libzmq queues per peer; the rest wait in the Outbox, counted in bytes


class BindRefused(ValueError):
    """The bind endpoint is not allowed (non-loopback without CURVE or --insecure) or malformed."""


@dataclass
class ServerConfig:
    """Transport settings of the server."""

    bind: str = DEFAULT_ENDPOINT
    max_queue: int = 64
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_queue_bytes: int = 4 * DEFAULT_MAX_MESSAGE_BYTES
    max_send_bytes: int = 4 * DEFAULT_MAX_MESSAGE_BYTES
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
    envelope: list[bytes]  # routing id (and the empty delimiter of a REQ client)
    body: list[Any]  # header frame first; only the first frames when `oversize`
    t_recv: float
    nbytes: int
    oversize: bool = False


class Server:
    """ROUTER socket + bounded queues in front of an Engine."""

    def __init__(self, engine: Engine, cfg: ServerConfig, metrics: Any = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self.ctx = zmq.Context()
        self.auth: ThreadAuthenticator | None = None
        self.router: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.outbox: Outbox | None = None
        self.queue: deque[_Pending] = deque()
        self.queue_bytes = 0
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
        router.setsockopt(zmq.SNDHWM, SNDHWM)
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
        self.outbox = Outbox(router, self.cfg.max_send_bytes, self.metrics)
        self.monitor = router.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    # ---- the loop -------------------------------------------------------------------------------

    def serve_forever(self) -> bool:
        """Serve until `stopping` is set (signal handler); then finish and snapshot.

        Returns False when the final snapshot failed (the caller exits 1).
        """
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        durability = self.engine.durability
        while not self.stopping:
            timeout = 0 if self.queue else (CHILD_POLL_MS if durability.child is not None else POLL_MS)
            wait = self.outbox.wait_ms()
            events = dict(poller.poll(timeout if wait is None else min(timeout, wait)))
            if self.monitor in events:
                self._drain_monitor()
            self.outbox.flush()
            self._admit()
            self._process_group()
            durability.poll(self.engine.store)  # finished snapshots send their deferred replies
        return self._shutdown()

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

    def _receive(self) -> _Pending | None:
        """One whole request, frame by frame; frames past --max-message-bytes are released as they come."""
        try:
            identity = self.router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        t_recv = time.perf_counter()
        body: list[Any] = []
        total, oversize, more = 0, False, identity.more
        while more:
            frame = self.router.recv(copy=False)  # the rest of a multipart message is already here
            more = frame.more
            total += frame_size(frame)
            if total > self.cfg.max_message_bytes:
                oversize = True
            if len(body) < 2 or not oversize:
                body.append(frame)  # keep the delimiter and header of an oversize request, for its reply
        envelope = [identity.bytes]
        if body and frame_size(body[0]) == 0:  # REQ clients send an empty delimiter first
            envelope.append(b"")
            body = body[1:]
        return _Pending(envelope, body, t_recv, total, oversize)

    def _admit(self) -> None:
        # Bounded, so a flood of refused requests cannot starve the queue.
        for _ in range(max(256, 4 * self.cfg.max_queue)):
            item = self._receive()
            if item is None:
                break
            if item.oversize:
                self._refuse(item, TooLarge(f"request of more than {self.cfg.max_message_bytes} bytes exceeds "
                                            f"--max-message-bytes {self.cfg.max_message_bytes}", limit="message_bytes"))
            elif self.outbox.blocked(item.envelope[0]) and self.outbox.full():
                self._refuse(item, Busy(f"replies to this client wait unread (--max-send-bytes "
                                        f"{self.cfg.max_send_bytes}); read them, then retry", limit="send_bytes"))
            elif len(self.queue) >= self.cfg.max_queue:
                self._refuse(item, Busy(f"queue full ({self.cfg.max_queue} requests waiting, --max-queue); retry "
                                        f"later", limit="queue"))
            elif self.queue_bytes + item.nbytes > self.cfg.max_queue_bytes:
                self._refuse(item, Busy(f"queue full ({self.queue_bytes} bytes waiting, --max-queue-bytes "
                                        f"{self.cfg.max_queue_bytes}); retry later", limit="queue_bytes"))
            else:
                self.queue.append(item)
                self.queue_bytes += item.nbytes
        self._set_depth()

    def _set_depth(self) -> None:
        self.engine.queue_depth = len(self.queue)
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.queue))
            self.metrics.queue_bytes.set(self.queue_bytes)

    def _refuse(self, item: _Pending, exc: MemoryServerError) -> None:
        """Answer without executing: the id and op echoed are what parse_head accepts of the header."""
        try:
            header = unpack_header(item.body[0], MAX_HEADER_BYTES) if item.body else None
            req_id, op = rq.peek_id_op(header)
            if isinstance(exc, TooLarge) and header is not None:
                rq.parse_head(header, item.nbytes, self.cfg.max_message_bytes)  # earlier faults win, as in the engine
        except MemoryServerError as early:
            req_id, op = rq.failed_id_op(early)
            if not isinstance(exc, Busy):
                exc = early
        if self.metrics is not None:
            if isinstance(exc, Busy):
                self.metrics.busy.inc()
            self.metrics.started.labels(op or "invalid").inc()
        self._send(item, self.engine.count(Reply(req_id, op, error=exc)))

    def _process_group(self) -> None:
        held: list[tuple[_Pending, Reply]] = []
        durability = self.engine.durability
        for _ in range(GROUP_MAX):
            if not self.queue or self.stopping:
                break
            item = self.queue.popleft()
            self.queue_bytes -= item.nbytes
            self._set_depth()
            reply = self.engine.handle_frames(item.body)
            if self.metrics is not None:
                self.metrics.started.labels(reply.op or "invalid").inc()
                self.metrics.request_bytes.labels(reply.op or "invalid").inc(item.nbytes)
            if reply.ticket is not None and not reply.ticket.done:
                reply.ticket.add_done_callback(lambda _t, item=item, reply=reply: self._send(item, reply.after_snapshot()))
            elif durability.dirty or held:
                held.append((item, reply.after_snapshot()))  # it may have read state that is not durable yet
            else:
                self._send(item, reply.after_snapshot())
            self._admit()
        if held:
            try:
                durability.commit()
            except OSError as exc:  # after a failed fsync the kernel may have dropped the pages: stop
                raise FatalError(f"fdatasync of the write-ahead log failed: {exc}") from exc
            for item, reply in held:
                self._send(item, reply)

    def _encode(self, reply: Reply) -> list[Any]:
        if reply.error is None:
            return encode_frames(ok_header(reply.req_id, reply.result or {}), reply.arrays)
        return encode_frames(error_header(reply.req_id, reply.error.code, reply.error.message))

    def _send(self, item: _Pending, reply: Reply) -> None:
        try:
            frames = self._encode(reply)
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be encoded is a bug, not a crash
            reply = self.engine.internal(reply.req_id, reply.op, exc)
            frames = self._encode(reply)
        nbytes = sum(frame_size(f) for f in frames)
        self.outbox.send(item.envelope, frames, nbytes)
        if self.metrics is not None:
            op = reply.op or "invalid"
            self.metrics.handled.labels(op, reply.code).inc()
            self.metrics.duration.labels(op).observe(time.perf_counter() - item.t_recv)
            self.metrics.response_bytes.labels(op).inc(nbytes)

    # ---- stopping -------------------------------------------------------------------------------

    def _shutdown(self) -> bool:
        """Refuse what is queued, finish the running snapshot, write a final one, flush replies."""
        while self.queue:
            item = self.queue.popleft()
            self._refuse(item, Busy("server is shutting down; retry later"))
        self.queue_bytes = 0
        self._set_depth()
        ok = self.engine.durability.close(self.engine.store, final_snapshot=True)
        self.outbox.flush(now=float("inf"))
        self.close()
        return ok

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

"""Replies to peers that are not reading, held in bytes-bounded queues (--max-send-bytes).

The ROUTER socket's per-peer pipe holds one reply (SNDHWM 1) and libzmq's encoder one more, so what
libzmq buffers for a peer is at most two replies, each at most --max-message-bytes. A reply that does
not fit (EAGAIN) waits here, in arrival order per peer, and is retried with back-off from the server
loop. All waiting replies together stay under --max-send-bytes: beyond it a reply is dropped (counted
in memsrv_dropped_replies_total; the client's retry gets an idempotent answer), and the server answers
a blocked peer's further requests `busy` until it reads.
"""

from __future__ import annotations

import errno
import logging
import time
from collections import deque
from typing import Any

import zmq

log = logging.getLogger(__name__)

_RETRY_S = (0.001, 0.1)  # per-peer retry delay: 1 ms doubling to 100 ms while it stays blocked


class _Peer:
    __slots__ = ("queue", "nbytes", "delay", "retry_at")

    def __init__(self) -> None:
        self.queue: deque[tuple[list[Any], int]] = deque()
        self.nbytes = 0
        self.delay = _RETRY_S[0]
        self.retry_at = 0.0


class Outbox:
    """Non-blocking sends on a ROUTER socket with a bytes-bounded overflow queue per peer."""

    def __init__(self, router: zmq.Socket, max_bytes: int, metrics: Any = None) -> None:
        self.router = router
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.peers: dict[bytes, _Peer] = {}
        self.nbytes = 0
        self.overflowing = False  # a reply was dropped for lack of room; cleared below half the bound

    def blocked(self, identity: bytes) -> bool:
        """True while replies to this peer are waiting here."""
        return identity in self.peers

    def full(self) -> bool:
        """True when the waiting replies have reached --max-send-bytes (or one did not fit)."""
        return self.overflowing or self.nbytes >= self.max_bytes

    def send(self, envelope: list[bytes], frames: list[Any], nbytes: int) -> bool:
        """Send now, or queue behind this peer's waiting replies; False when the reply had to be dropped."""
        identity = envelope[0]
        peer = self.peers.get(identity)
        if peer is None:
            try:
                self.router.send_multipart(envelope + frames, zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                pass
            except zmq.ZMQError as exc:
                if exc.errno != errno.EHOSTUNREACH:
                    raise
                return self._dropped("peer gone")
        if self.nbytes + nbytes > self.max_bytes:
            self.overflowing = True
            if self.metrics is not None:
                self.metrics.refusals.labels("send_bytes").inc()
            return self._dropped(f"{self.nbytes} bytes already wait for slow peers (--max-send-bytes {self.max_bytes})")
        if peer is None:
            peer = self.peers[identity] = _Peer()
            peer.retry_at = time.monotonic() + peer.delay
        peer.queue.append((envelope + frames, nbytes))
        peer.nbytes += nbytes
        self._add(nbytes)
        return True

    def _dropped(self, why: str) -> bool:
        log.debug("reply dropped: %s", why)
        if self.metrics is not None:
            self.metrics.dropped_replies.inc()
        return False

    def _add(self, n: int) -> None:
        self.nbytes += n
        if self.nbytes <= self.max_bytes // 2:
            self.overflowing = False
        if self.metrics is not None:
            self.metrics.send_bytes.set(self.nbytes)

    def flush(self, now: float | None = None) -> None:
        """Retry the peers whose back-off has passed; send what their pipes now take."""
        now = time.monotonic() if now is None else now
        for identity in [i for i, p in self.peers.items() if p.retry_at <= now]:
            peer = self.peers[identity]
            while peer.queue:
                msg, n = peer.queue[0]
                try:
                    self.router.send_multipart(msg, zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    peer.delay = min(2 * peer.delay, _RETRY_S[1])
                    peer.retry_at = now + peer.delay
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    for _ in peer.queue:
                        self._dropped("peer gone")
                    self._add(-peer.nbytes)
                    peer.queue.clear()
                    peer.nbytes = 0
                    break
                peer.queue.popleft()
                peer.nbytes -= n
                self._add(-n)
                peer.delay = _RETRY_S[0]
            if not peer.queue:
                del self.peers[identity]

    def wait_ms(self, now: float | None = None) -> int | None:
        """Milliseconds until the next retry is due (None when nothing waits)."""
        if not self.peers:
            return None
        now = time.monotonic() if now is None else now
        return max(0, int(1000 * (min(p.retry_at for p in self.peers.values()) - now)) + 1)

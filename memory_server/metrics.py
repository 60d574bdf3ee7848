"""Prometheus metrics of the memory server (names from SYSTEMS.md section 7), on a private registry.

Served by prometheus-client's HTTP server on 127.0.0.1 only. A private registry keeps several servers
(or tests) in one process from colliding. `memory` is a label because a server holds several memories.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# 50 us ... 5 s, roughly x2.5 per step.
LATENCY_BUCKETS = (5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """All server metrics; `serve(port)` exposes them."""

    def __init__(self, device: str = "cpu") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.device = device
        self.started = Counter("memsrv_requests_started_total", "Requests received, by op.", ["op"], registry=r)
        self.handled = Counter("memsrv_requests_handled_total", "Replies sent, by op and code "
                               "(ok, duplicate, or the error code).", ["op", "code"], registry=r)
        self.duration = Histogram("memsrv_request_duration_seconds", "Receipt to reply, by op.", ["op"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.compute = Histogram("memsrv_compute_duration_seconds", "Store work per request, by op.",
                                 ["op", "device"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("memsrv_queue_depth", "Requests admitted and waiting to execute.", registry=r)
        self.request_bytes = Counter("memsrv_request_bytes_total", "Request bytes, by op.", ["op"], registry=r)
        self.response_bytes = Counter("memsrv_response_bytes_total", "Reply bytes, by op.", ["op"], registry=r)
        self.slots = Gauge("memsrv_memory_slots", "Capacity of each memory.", ["memory"], registry=r)
        self.filled = Gauge("memsrv_memory_filled", "Slots written at least once.", ["memory"], registry=r)
        self.version = Gauge("memsrv_memory_version", "Version of each memory.", ["memory"], registry=r)
        self.replacements = Counter("memsrv_slot_replacements_total", "Slots written by update misses.",
                                    ["memory"], registry=r)
        self.refreshes = Counter("memsrv_key_refreshes_total", "Keys merged by update hits.", ["memory"], registry=r)
        self.snapshot_duration = Histogram("memsrv_snapshot_duration_seconds", "Snapshot start to durable.",
                                           buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.last_snapshot = Gauge("memsrv_last_snapshot_timestamp_seconds", "Unix time of the last durable "
                                   "snapshot.", registry=r)
        self.wal_bytes = Gauge("memsrv_wal_bytes", "Bytes in WAL segments not yet covered by a snapshot.",
                               registry=r)
        self.wal_fsync = Histogram("memsrv_wal_fsync_duration_seconds", "fdatasync of the WAL.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.clients = Gauge("memsrv_clients_connected", "Transport connections open.", registry=r)
        self.busy = Counter("memsrv_busy_total", "Requests refused with busy (queue full).", registry=r)
        self.dropped_replies = Counter("memsrv_dropped_replies_total", "Replies not deliverable (peer gone "
                                       "or its pipe full).", registry=r)
        self.snapshot_failures = Counter("memsrv_snapshot_failures_total", "Snapshots that could not be taken "
                                         "(fork, disk); each is retried with back-off.", registry=r)
        self.refusals = Counter("memsrv_limit_refusals_total", "Requests refused by a limit, by limit (flag or "
                                "protocol bound).", ["limit"], registry=r)
        self.queue_bytes = Gauge("memsrv_queue_bytes", "Bytes of requests admitted and waiting "
                                 "(--max-queue-bytes).", registry=r)
        self.send_bytes = Gauge("memsrv_send_queue_bytes", "Bytes of replies held for peers that are not reading "
                                "(--max-send-bytes).", registry=r)
        self.memory_bytes = Gauge("memsrv_memory_bytes", "Bytes each memory holds (arrays, scratch, window, "
                                  "search structures).", ["memory"], registry=r)
        self.memory_bytes_total = Gauge("memsrv_memory_bytes_total", "Bytes all memories hold "
                                        "(--max-memory-bytes).", registry=r)
        self.memories = Gauge("memsrv_memories", "Memories held (--max-memories).", registry=r)
        self.window_evictions = Counter("memsrv_window_evictions_total", "Idempotency replies forgotten before "
                                        "100,000 because of --max-memory-bytes.", registry=r)
        self._evictions_seen = 0
        self._http: Any = None
        self.port: int | None = None

    def serve(self, port: int) -> int:
        """Start the HTTP exporter on 127.0.0.1:port (0 picks one); returns the port."""
        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self._http = server
        self.port = server.server_port
        return self.port

    def set_memory(self, name: str, capacity: int, filled: int, version: int, nbytes: int | None = None) -> None:
        """Refresh the per-memory gauges."""
        self.slots.labels(name).set(capacity)
        self.filled.labels(name).set(filled)
        self.version.labels(name).set(version)
        if nbytes is not None:
            self.memory_bytes.labels(name).set(nbytes)

    def set_store(self, memories: int, nbytes: int, window_evictions: int) -> None:
        """Refresh the store-wide gauges."""
        self.memories.set(memories)
        self.memory_bytes_total.set(nbytes)
        if window_evictions > self._evictions_seen:
            self.window_evictions.inc(window_evictions - self._evictions_seen)
            self._evictions_seen = window_evictions

    def forget_memory(self, name: str) -> None:
        """Drop the per-memory series of a dropped memory."""
        for g in (self.slots, self.filled, self.version, self.replacements, self.refreshes, self.memory_bytes):
            try:
                g.remove(name)
            except KeyError:
                pass

    def close(self) -> None:
        """Stop the HTTP exporter."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

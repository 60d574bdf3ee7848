"""Prometheus metrics of a real server: the SYSTEMS.md section 7 names, and counters that move."""

from __future__ import annotations

import numpy as np
import pytest
from memserver_helpers import SMALL, raw_request, running_server, scrape_metrics

from memory_server.client import MemoryClient

pytestmark = pytest.mark.integration


def test_metrics_scrape_and_counters_increase(tmp_path):
    with running_server(tmp_path / "data", **SMALL, extra_args=["--metrics-port", "0"]) as srv:
        with MemoryClient(srv.endpoint, timeout_ms=20_000) as c:
            port = c.info()["metrics_port"]
            before = scrape_metrics(port)
            rng = np.random.default_rng(0)
            c.ping()
            c.ping()
            c.update(rng.standard_normal((3, 16)), rng.random((3, 8)) + 0.1, threshold=0.0)
            c.query(rng.standard_normal((2, 16)), 4)
            raw_request(srv.endpoint, [b"\xc1"])
            c.snapshot()
            after = scrape_metrics(port)
        assert srv.stop() == 0
    ok = 'memsrv_requests_handled_total{code="ok",op="ping"}'
    assert after[ok] - before.get(ok, 0) == 2
    assert after['memsrv_requests_started_total{op="update"}'] == 1
    assert after['memsrv_requests_handled_total{code="bad_request",op="invalid"}'] == 1
    assert after['memsrv_request_duration_seconds_count{op="query"}'] == 1
    assert after['memsrv_compute_duration_seconds_count{device="cpu",op="update"}'] == 1
    assert after['memsrv_memory_slots{memory="default"}'] == SMALL["capacity"]
    assert after['memsrv_memory_filled{memory="default"}'] == 3
    assert after['memsrv_memory_version{memory="default"}'] == 1
    assert after['memsrv_slot_replacements_total{memory="default"}'] == 3
    assert after["memsrv_snapshot_duration_seconds_count"] >= 1
    assert after["memsrv_last_snapshot_timestamp_seconds"] > 0
    assert after['memsrv_request_bytes_total{op="update"}'] > 3 * 16 * 4
    assert after['memsrv_response_bytes_total{op="query"}'] >= 2 * 4 * 12
    assert after["memsrv_wal_fsync_duration_seconds_count"] >= 1
    assert "memsrv_wal_bytes" in after and "memsrv_queue_depth" in after
    assert after["memsrv_clients_connected"] >= 1

"""Security of the real server: CURVE accepts authorised clients and refuses others; a non-loopback
bind needs CURVE or --insecure."""

from __future__ import annotations

import pytest
import zmq.auth
from memserver_helpers import SMALL, running_server

from memory_server.client import CurveKeys, MemoryClient, MemoryUnavailable
from memory_server.launcher import ServerStartError
from memory_server.server import is_loopback_endpoint

pytestmark = pytest.mark.integration


@pytest.fixture
def certs(tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    for name in ("server", "client", "intruder"):
        zmq.auth.create_certificates(str(keys), name)
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    return keys, allowed


def test_curve_accepts_authorised_and_refuses_others(tmp_path, certs):
    keys, allowed = certs
    args = ["--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients", str(allowed)]
    with running_server(None, durability="none", **SMALL, extra_args=args) as srv:
        good = CurveKeys.from_files(keys / "server.key", keys / "client.key_secret")
        with MemoryClient(srv.endpoint, timeout_ms=20_000, curve=good) as c:
            assert c.info()["capacity"] == SMALL["capacity"]
        bad = CurveKeys.from_files(keys / "server.key", keys / "intruder.key_secret")
        with MemoryClient(srv.endpoint, timeout_ms=500, retries=1, curve=bad) as c:
            with pytest.raises(MemoryUnavailable):
                c.ping()
        with MemoryClient(srv.endpoint, timeout_ms=500, retries=0) as c:  # no CURVE at all
            with pytest.raises(MemoryUnavailable):
                c.ping()
        with MemoryClient(srv.endpoint, timeout_ms=20_000, curve=good) as c:  # still serving
            assert c.ping()["time"] > 0
        assert srv.stop() == 0


def test_non_loopback_bind_refused_without_curve_or_insecure(tmp_path):
    with pytest.raises(ServerStartError, match=r"code 2[\s\S]*refusing to bind non-loopback"):
        with running_server(None, bind="tcp://0.0.0.0:0", durability="none", **SMALL):
            pass


def test_non_loopback_bind_with_insecure_or_curve(tmp_path, certs):
    keys, allowed = certs
    with running_server(None, bind="tcp://0.0.0.0:0", durability="none", **SMALL, extra_args=["--insecure"]) as srv:
        port = srv.endpoint.rsplit(":", 1)[1]
        with MemoryClient(f"tcp://127.0.0.1:{port}", timeout_ms=20_000) as c:
            assert c.ping()["time"] > 0
        assert srv.stop() == 0
    args = ["--curve-secret-key", str(keys / "server.key_secret"), "--curve-clients", str(allowed)]
    with running_server(None, bind="tcp://*:0", durability="none", **SMALL, extra_args=args) as srv:
        assert srv.stop() == 0


def test_curve_needs_both_flags():
    with pytest.raises(ServerStartError, match="CURVE needs both"):
        with running_server(None, durability="none", extra_args=["--curve-clients", "/tmp"]):
            pass


@pytest.mark.parametrize("endpoint,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:1", True), ("tcp://[::1]:0", True),
    ("ipc:///tmp/x.sock", True), ("tcp://0.0.0.0:1", False), ("tcp://*:1", False), ("tcp://10.1.2.3:1", False),
])
def test_loopback_classification(endpoint, loopback):
    assert is_loopback_endpoint(endpoint) is loopback

"""Shared helpers for the memory-server tests: real server processes, raw sockets, a numpy reference.

`reference_update` is a plain, independent numpy statement of PROTOCOL.md's update rule (full matmul,
lexsort), written without the package's rules module so that the two can disagree.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from memory_server.launcher import ServerProcess, start_server

SMALL = {"capacity": 64, "key_dim": 16, "value_dim": 8}


@contextlib.contextmanager
def running_server(data_dir: Path | None, **kw: Any) -> Iterator[ServerProcess]:
    """start_server, and always kill the process on the way out (stop() is the test's business).

    The log goes next to the data dir (kept with pytest's tmp dirs); a RAM-only server's log is
    deleted afterwards.
    """
    temp_log = None
    if data_dir is not None:
        kw.setdefault("log_path", data_dir.parent / f"server-{time.time_ns()}.log")
    elif "log_path" not in kw:
        fd, name = tempfile.mkstemp(prefix="memory-server-test-", suffix=".log")
        os.close(fd)
        temp_log = kw["log_path"] = Path(name)
    try:
        srv = start_server(data_dir, **kw)
        try:
            yield srv
        finally:
            if srv.poll() is None:
                srv.kill()
    finally:
        if temp_log is not None:
            temp_log.unlink(missing_ok=True)


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1 (for restarting a server on the same endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_metrics(port: int) -> dict[str, float]:
    """The server's Prometheus metrics: 'name{labels}' -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=20).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+|NaN)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def header_bytes(**fields: Any) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def raw_request(endpoint: str, frames: list[Any], timeout_s: float = 20.0,
                socket_type: int = zmq.DEALER) -> tuple[dict[str, Any], list[bytes]] | None:
    """Send raw frames on a fresh socket; (reply header, array frames) or None if no reply in time."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(socket_type)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = sock.recv_multipart()
    finally:
        sock.close(0)
    if socket_type == zmq.DEALER and reply and reply[0] == b"":
        reply = reply[1:]
    return msgpack.unpackb(reply[0], raw=False), reply[1:]


def unit(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.linalg.norm(x64, axis=-1, keepdims=True)).astype(np.float32)


def initial_state(capacity: int, key_dim: int, value_dim: int, seed: int) -> dict[str, np.ndarray]:
    """A fresh memory as PROTOCOL.md `create` (and the README's key formula) define it."""
    keys = np.random.default_rng(seed).standard_normal((capacity, key_dim), dtype=np.float32)
    return {"keys": unit(keys), "values": np.full((capacity, value_dim), 1 / value_dim, np.float32),
            "ages": np.zeros(capacity, np.float32), "item_ids": np.full(capacity, -1, np.int64)}


def reference_kl(p: np.ndarray, v: np.ndarray) -> float:
    """KL(p || v/sum v) with 0 ln 0 = 0, float64, clipped at 0."""
    p = p.astype(np.float64)
    vn = v.astype(np.float64) / v.astype(np.float64).sum()
    terms = np.zeros_like(p)
    pos = p > 0
    terms[pos] = p[pos] * (np.log(p[pos]) - np.log(vn[pos] + 1e-8))
    return max(0.0, float(terms.sum()))


def reference_update(state: dict[str, np.ndarray], q: np.ndarray, v: np.ndarray, threshold: float,
                     age_noise: float = 0.0, seed: int | None = None,
                     item_ids: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """(new state, hit [B], slots [B]) of one update request, straight from PROTOCOL.md."""
    keys, values = state["keys"].copy(), state["values"].copy()
    ages, ids = state["ages"].copy(), state["item_ids"].copy()
    m = keys.shape[0]
    q_hat = unit(q)
    ages = ages + np.float32(1)  # step 1
    sims = q_hat.astype(np.float64) @ keys.astype(np.float64).T
    nearest = np.argmax(sims, axis=1)  # first maximum = lower slot
    hit = np.array([reference_kl(values[n], v[i]) < threshold for i, n in enumerate(nearest)], bool)
    slots = nearest.copy()
    hit_slots = sorted(set(nearest[hit].tolist()))
    for n in hit_slots:
        acc = keys[n].astype(np.float64)
        for i in np.flatnonzero(hit & (nearest == n)):
            acc = acc + q_hat[i].astype(np.float64)
        keys[n] = (acc / np.linalg.norm(acc)).astype(np.float32)
    r = np.random.default_rng(seed).uniform(-age_noise, age_noise, m) if age_noise > 0 else np.zeros(m)
    scores = ages.astype(np.float64) + r
    scores[hit_slots] = -np.inf
    order = np.lexsort((np.arange(m), -scores))
    for j, i in enumerate(np.flatnonzero(~hit)):
        s = order[j]
        slots[i] = s
        keys[s] = q_hat[i]
        values[s] = (v[i].astype(np.float64) / v[i].astype(np.float64).sum()).astype(np.float32)
        ages[s] = 0
        ids[s] = -1 if item_ids is None else item_ids[i]
    ages[hit_slots] = 0
    return {"keys": keys, "values": values, "ages": ages, "item_ids": ids}, hit, slots


class UpdateStream:
    """Deterministic update payloads drawn around a pool of 'images', so some rows hit and some miss."""

    def __init__(self, key_dim: int, value_dim: int, seed: int, pool: int = 12, batch: int = 6) -> None:
        self.rng = np.random.default_rng(seed)
        self.key_dim, self.value_dim, self.batch = key_dim, value_dim, batch
        self.pool_q = self.rng.standard_normal((pool, key_dim)).astype(np.float32)
        raw = self.rng.random((pool, value_dim)) * (self.rng.random((pool, value_dim)) < 0.6)
        raw[:, 0] += 0.05  # never an all-zero row
        self.pool_v = raw.astype(np.float32)
        self.n = 0

    def next(self) -> dict[str, Any]:
        """kwargs of MemoryClient.update for the next request."""
        pick = self.rng.integers(0, len(self.pool_q), self.batch)
        q = self.pool_q[pick] + 0.05 * self.rng.standard_normal((self.batch, self.key_dim)).astype(np.float32)
        self.n += 1
        return {"q": q.astype(np.float32), "v": self.pool_v[pick], "threshold": 0.3,
                "age_noise": 2.0, "seed": 1000 + self.n, "item_ids": pick.astype(np.int64) + 100 * self.n}


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray], exact: bool = True) -> None:
    """Two exports hold the same memory (keys bit-exact when `exact`)."""
    for name in ("values", "ages", "item_ids"):
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    if exact:
        np.testing.assert_array_equal(a["keys"], b["keys"], err_msg="keys")
    else:
        np.testing.assert_allclose(a["keys"], b["keys"], atol=2e-6, err_msg="keys")


def update_worker(endpoint: str, seed: int, n: int) -> list[int]:
    """Body of one concurrent client process: n updates, returns the versions it was given."""
    from memory_server.client import MemoryClient  # noqa: PLC0415 - runs in a spawned process

    stream = UpdateStream(16, 8, seed=seed, batch=4)
    with MemoryClient(endpoint, timeout_ms=30_000, retries=2) as c:
        return [c.update(**stream.next())["version"] for _ in range(n)]

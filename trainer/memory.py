"""The memory the training loop talks to: a client of a running server, or an embedded one rank 0 starts.

With `memory.address: null`, rank 0 spawns `python -m memory_server` on a free loopback port with its
data directory inside the run's out_dir, waits for READY and shares the endpoint with every rank; it
stops the server (SIGTERM: snapshot, exit 0) when the run ends, also on errors. Every rank then holds
its own MemoryClient; all of them read and update the one shared memory. `calls` counts the training
traffic (phase-1 queries and updates); retrieval for validation and checks is not counted.

With `memory.pipeline: true` a phase-1 update is sent without waiting (`submit_update`); its reply is
collected by the next memory call of any kind, at the latest when the next step's query is sent, so
the server's update search overlaps the trainer's data loading and forward while the requests still
take effect in the order they were made (the memory is the same, bit for bit, as without pipelining).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from memory_server.client import MemoryClient, PendingReply
from memory_server.launcher import start_server
from memory_server.local import InProcessMemory
from trainer.checkpoint import restore_memory
from trainer.config import MemoryConfig
from trainer.retrieval import PAPER, RetrievalOptions, retrieve_color_feature

log = logging.getLogger(__name__)


class TrainerMemory:
    """One rank's handle on the shared memory (named cfg.name) plus, on rank 0, the embedded server."""

    def __init__(self, cfg: MemoryConfig, out_dir: str | Path, rank: int, broadcast_object=None) -> None:
        self.cfg = cfg
        self.server = None
        self.calls = {"query": 0, "update": 0}
        self.written = {"hits": 0, "misses": 0}  # rows of the collected training updates
        self._pending: PendingReply | None = None  # the last training update, sent, not yet collected
        endpoint = cfg.address
        if endpoint == "inproc":
            # The same store code in this process, no server (one process only): debugging, benchmarks.
            if broadcast_object is not None:
                raise ValueError("memory.address 'inproc' serves one process only; use null (embedded server) "
                                 "or a server address for multi-process runs")
            self.endpoint = "inproc"
            self.client = InProcessMemory(memory=cfg.name, durability="none")
            return
        if endpoint is None:
            if rank == 0:
                data_dir = Path(out_dir) / "memory-server"
                data_dir.mkdir(parents=True, exist_ok=True)
                self.server = start_server(
                    data_dir, bind="tcp://127.0.0.1:0", durability=cfg.durability,
                    log_path=Path(out_dir) / "memory-server.log",
                )
                endpoint = self.server.endpoint
                log.info("embedded memory server at %s (data in %s)", endpoint, data_dir)
            if broadcast_object is not None:
                endpoint = broadcast_object(endpoint)
        self.endpoint = endpoint
        self.client = MemoryClient(endpoint, timeout_ms=cfg.timeout_ms, retries=cfg.retries, memory=cfg.name)

    # --- set-up -----------------------------------------------------------------------------------
    def ensure(self, capacity: int, key_dim: int, value_dim: int, seed: int) -> dict:
        """Create the memory if absent (idempotent; a different shape is the server's `exists` error)."""
        self.client.create(capacity=capacity, key_dim=key_dim, value_dim=value_dim, seed=seed)
        return self.client.info()

    # --- the ops the loop uses --------------------------------------------------------------------
    def query(self, q: np.ndarray, k: int, targets: np.ndarray | None = None, fields=(), memory=None) -> dict:
        self.calls["query"] += 1
        self._raise_pending()
        return self.client.query(q, k=k, targets=targets, fields=tuple(fields), memory=memory)

    def update(self, q: np.ndarray, v: np.ndarray, threshold: float, age_noise: float, seed: int,
               item_ids: np.ndarray | None = None) -> dict:
        """A blocking update (whatever memory.pipeline says)."""
        self.submit_update(q, v, threshold, age_noise, seed, item_ids, wait=True)
        return self.take_update()

    def submit_update(self, q: np.ndarray, v: np.ndarray, threshold: float, age_noise: float, seed: int,
                      item_ids: np.ndarray | None = None, wait: bool | None = None) -> None:
        """Send a training update; without memory.pipeline (or with wait=True) its reply is awaited here.
        The reply is read with take_update(); an earlier one not taken yet is collected first."""
        self.take_update()
        self.calls["update"] += 1
        self._pending = self.client.update_async(q, v, threshold=threshold, age_noise=age_noise, seed=seed,
                                                 item_ids=item_ids)
        if (not self.cfg.pipeline) if wait is None else wait:
            self._pending.result()  # its error, if any, raised now; the reply stays for take_update

    def take_update(self) -> dict | None:
        """The reply to the last submitted update (waiting for it within the client's deadline), or None
        when there is none not yet taken. Its error, if any, is raised here."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        reply = pending.result()
        hits = int(np.count_nonzero(reply["hit"]))
        self.written["hits"] += hits
        self.written["misses"] += int(reply["hit"].shape[0]) - hits
        return reply

    def _raise_pending(self) -> None:
        """Before any other op: the update in flight completes first (order, and its error surfaces)."""
        if self._pending is not None and not self._pending.collected:
            self._pending.result()

    def info(self) -> dict:
        self._raise_pending()
        return self.client.info()

    def export(self) -> dict[str, np.ndarray]:
        """The whole memory (keys, values, ages, item_ids) and its version."""
        self._raise_pending()
        return self.client.export()

    def restore(self, state: dict[str, np.ndarray]) -> int:
        """Overwrite every slot with a checkpoint's export; returns the server's version afterwards."""
        self._raise_pending()
        return restore_memory(self.client, state)

    def retrieve(self, extractor: nn.Module, light: Tensor, options: RetrievalOptions = PAPER
                 ) -> tuple[Tensor, np.ndarray]:
        """Test-time retrieval (trainer.retrieval) from this memory; not counted as training traffic."""
        self._raise_pending()
        return retrieve_color_feature(extractor, light, self.client, capacity=self.cfg.capacity, options=options)

    def close(self) -> None:
        try:
            if self._pending is not None and not self._pending.collected:
                try:  # the last update lands (or its error is logged) before the server stops
                    self._pending.result()
                except Exception:  # noqa: BLE001 - closing must still stop the server
                    log.exception("the last memory update failed")
            self.client.close()
        finally:
            if self.server is not None:
                code = self.server.stop()
                if code != 0:
                    log.warning("embedded memory server exited with code %s", code)
                self.server = None


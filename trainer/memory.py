"""The memory the training loop talks to: a client of a running server, or an embedded one rank 0 starts.

With `memory.address: null`, rank 0 spawns `python -m memory_server` on a free loopback port with its
data directory inside the run's out_dir, waits for READY and shares the endpoint with every rank; it
stops the server (SIGTERM: snapshot, exit 0) when the run ends, also on errors. Every rank then holds
its own MemoryClient; all of them read and update the one shared memory. `calls` counts the training
traffic (phase-1 queries and updates); retrieval for validation and checks is not counted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from torch import Tensor, nn

from memory_server.client import MemoryClient
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
        return self.client.query(q, k=k, targets=targets, fields=tuple(fields), memory=memory)

    def update(self, q: np.ndarray, v: np.ndarray, threshold: float, age_noise: float, seed: int,
               item_ids: np.ndarray | None = None) -> dict:
        self.calls["update"] += 1
        return self.client.update(q, v, threshold=threshold, age_noise=age_noise, seed=seed, item_ids=item_ids)

    def info(self) -> dict:
        return self.client.info()

    def export(self) -> dict[str, np.ndarray]:
        """The whole memory (keys, values, ages, item_ids) and its version."""
        return self.client.export()

    def restore(self, state: dict[str, np.ndarray]) -> int:
        """Overwrite every slot with a checkpoint's export; returns the server's version afterwards."""
        return restore_memory(self.client, state)

    def retrieve(self, extractor: nn.Module, light: Tensor, options: RetrievalOptions = PAPER
                 ) -> tuple[Tensor, np.ndarray]:
        """Test-time retrieval (trainer.retrieval) from this memory; not counted as training traffic."""
        return retrieve_color_feature(extractor, light, self.client, capacity=self.cfg.capacity, options=options)

    def close(self) -> None:
        try:
            self.client.close()
        finally:
            if self.server is not None:
                code = self.server.stop()
                if code != 0:
                    log.warning("embedded memory server exited with code %s", code)
                self.server = None


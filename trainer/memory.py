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

With `memory.key_cache` (trainer.keymirror), a rank that is the memory's only writer keeps the keys
itself and phase-1 queries come back without them (4 MiB less per step at k 256); with
`memory.local_queries` as well it keeps a replica of the whole memory (memory_server.replica) and
answers its phase-1 queries itself, so only the pipelined updates reach the server.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from memory_server.client import MemoryClient, PendingReply, rows_per_get
from memory_server.launcher import start_server
from memory_server.local import InProcessMemory
from memory_server.protocol import MemoryServerError
from memory_server.replica import Replica, ReplicaUnavailable, replica_nbytes
from trainer.checkpoint import restore_memory
from trainer.config import MemoryConfig
from trainer.keymirror import KeyMirror, MirrorStale
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
        self._pending_q: np.ndarray | None = None  # its queries, replayed into the key mirror
        self._pending_v: tuple[np.ndarray, np.ndarray | None] | None = None  # its targets and item ids (replica)
        self._pending_applied = False
        self.mirror: KeyMirror | None = None
        # auto: only a single-process run is sure to be the only writer; a mirror another client makes
        # stale is dropped at the first version mismatch, so "true" is safe, merely wasted, with ranks.
        self.key_cache = cfg.key_cache is True or (cfg.key_cache == "auto" and broadcast_object is None)
        # A replica of an in-process memory would only repeat its work.
        self.local_queries = cfg.local_queries and cfg.address != "inproc"
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

    def query_with_keys(self, q: np.ndarray, k: int, targets: np.ndarray, device: torch.device
                        ) -> tuple[dict, Tensor]:
        """A phase-1 query: its reply and the top-k keys [B, k, dk] on `device`, from the key mirror when
        there is one (the reply then carries no keys), else from the reply."""
        self._raise_pending()
        if self.key_cache and self.mirror is None:
            self._start_mirror(device)
        if self.mirror is not None and self.mirror.replica is not None:
            try:
                reply = self.mirror.query(q, k, targets)
            except MirrorStale as err:
                self._drop_mirror(err)  # and this query goes to the server below
            else:
                self.calls["query"] += 1
                return reply, self.mirror.gather(reply["slots"])
        if self.mirror is not None:
            self.calls["query"] += 1
            reply = self.client.query(q, k=k, targets=targets)
            if int(reply["version"]) == self.mirror.version:
                return reply, self.mirror.gather(reply["slots"])
            self._drop_mirror(MirrorStale(f"query reply at version {reply['version']}, the mirror at "
                                          f"{self.mirror.version}"))
        reply = self.query(q, k=k, targets=targets, fields=("keys",))
        return reply, torch.from_numpy(reply["keys"]).to(device)

    def _start_mirror(self, device: torch.device) -> None:
        info = self.client.info()
        limit = self.cfg.key_cache_mb * 2**20
        if info["capacity"] * info["key_dim"] * 4 > limit:
            log.info("memory.key_cache off: %d x %d keys exceed memory.key_cache_mb=%d", info["capacity"],
                     info["key_dim"], self.cfg.key_cache_mb)
            self.key_cache = False
            return
        try:
            replica = self._start_replica(info, limit)
            self.mirror = KeyMirror(self.client, int(info["capacity"]), device, replica=replica,
                                    rows_per_get=rows_per_get(info))
        except (MirrorStale, MemoryServerError) as err:  # e.g. the server busy or refusing the reads: go on
            self._drop_mirror(err)
            return
        if replica is not None:
            log.info("memory.local_queries: phase-1 queries are answered by this process's replica of the memory "
                     "(%d slots, version %d, backend %s); the server gets the updates", info["capacity"],
                     self.mirror.version, info["backend"])
        else:
            log.info("memory.key_cache: phase-1 queries read their keys from this process's copy (%d slots, "
                     "version %d)", info["capacity"], self.mirror.version)

    def _start_replica(self, info: dict, limit: int) -> Replica | None:
        if not self.local_queries:
            return None
        why = None
        if replica_nbytes(info) > limit:
            why = f"a replica needs {replica_nbytes(info) / 2**20:.0f} MiB, over memory.key_cache_mb={self.cfg.key_cache_mb}"
        else:
            try:
                return Replica(self.client, info=info)
            except ReplicaUnavailable as exc:
                why = str(exc)
        log.info("memory.local_queries off (%s): phase-1 queries go to the server", why)
        self.local_queries = False
        return None

    def _drop_mirror(self, why: Exception) -> None:
        log.warning("memory.key_cache dropped (%s): phase-1 queries carry their keys from now on", why)
        self.mirror = None
        self.key_cache = False

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
        self._pending_q, self._pending_v, self._pending_applied = q, (v, item_ids), False
        if (not self.cfg.pipeline) if wait is None else wait:
            self._collect()  # its error, if any, raised now; the reply stays for take_update

    def take_update(self) -> dict | None:
        """The reply to the last submitted update (waiting for it within the client's deadline), or None
        when there is none not yet taken. Its error, if any, is raised here."""
        if self._pending is None:
            return None
        reply = self._collect()
        self._pending = self._pending_q = self._pending_v = None
        hits = int(np.count_nonzero(reply["hit"]))
        self.written["hits"] += hits
        self.written["misses"] += int(reply["hit"].shape[0]) - hits
        return reply

    def _raise_pending(self) -> None:
        """Before any other op: the update in flight completes first (order, and its error surfaces)."""
        if self._pending is not None:
            self._collect()

    def _collect(self) -> dict:
        """The pending update's reply (waiting for it), replayed into the key mirror once."""
        reply = self._pending.result()
        if not self._pending_applied:
            self._pending_applied = True
            if self.mirror is not None:
                try:
                    self.mirror.apply_update(self._pending_q, reply, *self._pending_v)
                except MirrorStale as err:
                    self._drop_mirror(err)
        return reply

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
        self.mirror = None  # rebuilt from the restored keys by the next phase-1 query
        return restore_memory(self.client, state)

    def retrieve(self, extractor: nn.Module, light: Tensor, options: RetrievalOptions = PAPER,
                 exclude_ids: np.ndarray | None = None) -> tuple[Tensor, np.ndarray]:
        """Test-time retrieval (trainer.retrieval) from this memory; not counted as training traffic."""
        self._raise_pending()
        return retrieve_color_feature(extractor, light, self.client, capacity=self.cfg.capacity, options=options,
                                      exclude_ids=exclude_ids)

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


"""InProcessMemory: MemoryClient's methods and return values, executed on an in-process Engine.

No sockets, no encoding: requests go straight to `Engine.execute`, so validation, errors and results
are those of the server. Used as the benchmarks' in-process baseline ("the same search on the same
store") and wherever a test or tool wants a memory without a process.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backends import resolve_backend
from .client import MemoryApi, as_wire_arrays
from .durability import Durability, DurabilityConfig
from .engine import Engine, Limits
from .protocol import DEFAULT_MAX_MEMORIES, DEFAULT_MAX_MEMORY_BYTES, DEFAULT_MEMORY
from .store import MemoryStore


class InProcessMemory(MemoryApi):
    """The MemoryClient API on an Engine in this process (one thread at a time)."""

    def __init__(self, store_or_args: Engine | MemoryStore | dict[str, Any] | None = None, *,
                 memory: str = DEFAULT_MEMORY, capacity: int | None = None, key_dim: int | None = None,
                 value_dim: int | None = None, seed: int | None = None, backend: str = "auto",
                 data_dir: str | Path | None = None, durability: str = "none",
                 max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES, max_memories: int = DEFAULT_MAX_MEMORIES) -> None:
        self.memory = memory
        self._ids = itertools.count(1)
        self._prefix = "local-" + uuid.uuid4().hex[:12]
        if isinstance(store_or_args, dict):
            kw = dict(store_or_args)
            capacity, key_dim, value_dim = kw.pop("capacity", capacity), kw.pop("key_dim", key_dim), kw.pop("value_dim", value_dim)
            seed, backend = kw.pop("seed", seed), kw.pop("backend", backend)
            data_dir, durability = kw.pop("data_dir", data_dir), kw.pop("durability", durability)
            if kw:
                raise TypeError(f"unknown InProcessMemory args {sorted(kw)}")
            store_or_args = None
        if isinstance(store_or_args, Engine):
            self.engine = store_or_args
        else:
            store = store_or_args if isinstance(store_or_args, MemoryStore) else MemoryStore(
                resolve_backend(backend), max_memory_bytes, max_memories)
            dur = Durability(DurabilityConfig(data_dir=Path(data_dir) if data_dir else None, mode=durability,
                                              fork_snapshots=False))
            dur.open(store)
            self.engine = Engine(store, dur, Limits(max_memory_bytes=max_memory_bytes))
        if capacity is not None:
            self.create(capacity, key_dim, value_dim, seed=seed)

    @property
    def store(self) -> MemoryStore:
        return self.engine.store

    def _call(self, op: str, args: dict[str, Any] | None, arrays: Sequence[tuple[str, np.ndarray]],
              memory: str | None, req_id: Any = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        req_id = f"{self._prefix}-{next(self._ids)}" if req_id is None else req_id
        reply = self.engine.execute(op, req_id, memory or self.memory, dict(args or {}), as_wire_arrays(arrays))
        dur = self.engine.durability
        if reply.ticket is not None:
            dur.wait(reply.ticket, self.engine.store)  # blocks on the snapshot child, no polling
            reply = reply.after_snapshot()
        elif reply.mutated:
            dur.commit()
        dur.poll(self.engine.store)  # periodic snapshots and their back-off, as the server loop does
        if reply.error is not None:
            raise reply.error
        return reply.result or {}, dict(reply.arrays)

    def close(self) -> bool:
        """Write a final snapshot (if durable) and release the data dir; False if that snapshot failed."""
        return self.engine.durability.close(self.engine.store, final_snapshot=True)

    def __enter__(self) -> InProcessMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Replica: a read-only copy of one server memory in the process of that memory's only writer.

A writer that knows every change to a memory (its own `update`s, whose replies say which rows hit and
which slots the misses took) can keep an exact copy and answer its own queries from it, with the
server's own code: the copy is an in-process Engine (InProcessMemory) over the same backend and index
options, filled by one `export` (chunked `get`s at one version when it is large), and each update is
replayed as the UpdateEffect the server applied (the write-ahead log's record), rebuilt from the request
and its reply. The server still plans every update (its search, the age-based replacement), logs it
and serves everyone else; only the writer's reads stop crossing the wire. Exactness is the caller's to check (trainer.keymirror compares versions on
every update and the server's answers now and then); a replica is never written by anything else.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import requests as rq
from . import rules
from .backends import BackendUnavailable, IndexOptions, check_index_options, resolve_backend
from .client import MemoryApi, as_wire_arrays
from .durability import Durability, DurabilityConfig
from .effects import UpdateEffect
from .engine import Engine, Limits
from .local import InProcessMemory
from .store import Memory, MemoryStore, arrays_nbytes

BACKENDS = {"faiss-cpu": "faiss", "faiss-gpu": "faiss", "torch-cpu": "torch", "torch-cuda": "torch"}


class ReplicaUnavailable(RuntimeError):
    """This process cannot answer like the server (another index or backend), or the memory moved."""


def replica_nbytes(info: dict[str, Any]) -> int:
    """Bytes the arrays of a replica of the memory `info` describes take (as the server's, no index)."""
    return arrays_nbytes(int(info["capacity"]), int(info["key_dim"]), int(info["value_dim"]),
                         info.get("value_dtype", "float32"))


def _same_backend(info: dict[str, Any]) -> str:
    """The server's backend if this process can run it with the same options, else ReplicaUnavailable."""
    backend, index, key_dtype = info.get("backend"), info.get("index", "exact"), info.get("key_dtype", "float32")
    if index != "exact":  # an approximate index depends on its training history: not reproducible here
        raise ReplicaUnavailable(f"the server's index is {index!r}; a replica answers like an exact index only")
    if backend not in BACKENDS:
        raise ReplicaUnavailable(f"the server's backend {backend!r} is not one this process knows")
    try:
        here = resolve_backend(BACKENDS[backend])
        check_index_options(here, IndexOptions(index="exact", key_dtype=key_dtype))
    except BackendUnavailable as exc:
        raise ReplicaUnavailable(f"backend {backend!r} cannot run here ({exc})") from None
    if here != backend:
        raise ReplicaUnavailable(f"the server searches on {backend!r}, this process would on {here!r}")
    return backend


class Replica(InProcessMemory):
    """The server memory `memory` as of `version`, answering `query` (and `get`) like the server."""

    def __init__(self, client: MemoryApi, memory: str | None = None, info: dict[str, Any] | None = None) -> None:
        memory = memory or client.memory
        info = client.info(memory) if info is None else info
        backend = _same_backend(info)
        capacity = int(info["capacity"])
        state = client.export(memory)  # within the server's limits, at one version
        keys, values, ages, item_ids = (np.ascontiguousarray(state[n]) for n in ("keys", "values", "ages", "item_ids"))
        version = state["version"]
        value_dtype = info.get("value_dtype", "float32")
        # Which slots were ever written is not exported; it feeds only the approximate index and
        # the `filled` count, neither of which a replica uses.
        mem = Memory(memory, keys, values.astype(value_dtype), ages, item_ids, np.zeros(capacity, bool),
                     version=int(version))
        store = MemoryStore(backend, index=IndexOptions(index="exact", key_dtype=info.get("key_dtype", "float32")),
                            value_dtype=value_dtype)
        store.add(mem)
        durability = Durability(DurabilityConfig(data_dir=None, mode="none", fork_snapshots=False))
        durability.open(store)
        # The server's request limits, so a query it would answer is answered here too.
        limits = Limits(max_message_bytes=int(info["max_message_bytes"]), max_batch=int(info["max_batch"]))
        super().__init__(Engine(store, durability, limits), memory=memory)
        self.mem = mem

    @property
    def version(self) -> int:
        return self.mem.version

    def follow_update(self, q: np.ndarray, v: np.ndarray, item_ids: np.ndarray | None, reply: dict[str, Any]
                      ) -> np.ndarray:
        """Apply the update `q`, `v`, `item_ids` as the server did, given its reply; the written slots.

        ReplicaUnavailable when the reply is not the next version (another client wrote in between).
        """
        mem = self.mem
        if int(reply["version"]) != mem.version + 1:
            raise ReplicaUnavailable(f"update reply at version {reply['version']}, the replica at {mem.version}")
        # What the server decoded: the client's wire arrays, checked and normalised by the same code.
        wire = as_wire_arrays([("q", q if q.dtype in (np.float32, np.float16) else q.astype(np.float32)),
                               ("v", v if v.dtype in (np.float32, np.float16) else v.astype(np.float32))])
        q_hat = rq.unit_rows("q", rq.array(wire, "q", rq.FLOATS, (None, mem.key_dim)))
        v_norm = rq.distributions("v", rq.array(wire, "v", rq.FLOATS, (q_hat.shape[0], mem.value_dim)))
        hit, row_slots = np.asarray(reply["hit"], bool), np.asarray(reply["slots"], np.int64)
        miss = ~hit
        if hit.any():
            hit_slots, hit_keys = rules.merge_hit_keys(mem.keys, row_slots[hit], q_hat[hit])
        else:
            hit_slots, hit_keys = np.empty(0, np.int64), np.empty((0, mem.key_dim), np.float32)
        ids = (np.asarray(item_ids, np.int64)[miss] if item_ids is not None
               else np.full(int(miss.sum()), -1, np.int64))
        effect = UpdateEffect(
            name=mem.name, version=mem.version + 1, req_id=f"replica-{mem.version + 1}",
            written_slots=np.concatenate([hit_slots, row_slots[miss]]).astype(np.int64, copy=False),
            written_keys=np.concatenate([hit_keys, q_hat[miss]]).astype(np.float32, copy=False),
            miss_slots=row_slots[miss], miss_values=v_norm[miss].astype(np.float32), miss_item_ids=ids,
            hit=hit, row_slots=row_slots,
        )
        self.store.apply(effect)
        return effect.written_slots

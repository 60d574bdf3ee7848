"""MemoryStore: the named memories (keys/values/ages/item_ids + search) and their state transitions.

Mutations are split in two: `plan_*` computes an effect from the current state without changing it,
`apply` writes an effect in place. The server logs the effect between the two, and WAL replay calls
the same `apply`, so recovery reproduces the live state bit for bit. One thread owns a store: no locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules
from .backends import Searcher, make_searcher
from .effects import CreateEffect, DropEffect, Effect, PutEffect, UpdateEffect
from .protocol import IDEMPOTENCY_WINDOW, Exists, NoSuchMemory, TooLarge

MAX_CAPACITY = 2**31 - 1  # slots are stored as int32 in the idempotency window


@dataclass(frozen=True)
class WindowEntry:
    """A remembered reply of a successful update (hit/slots) or put (both None)."""

    version: int
    hit: np.ndarray | None = None  # [B] bool
    slots: np.ndarray | None = None  # [B] int32

    def reply(self) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
        """(result, arrays) exactly as first sent."""
        if self.hit is None:
            return {"version": self.version}, []
        return {"version": self.version}, [("hit", self.hit), ("slots", self.slots.astype(np.int64))]


def memory_nbytes(capacity: int, key_dim: int, value_dim: int) -> int:
    """Bytes of a memory's protocol arrays (keys, values, ages, item_ids)."""
    return capacity * (4 * key_dim + 4 * value_dim + 4 + 8)


def initial_keys(capacity: int, key_dim: int, seed: int) -> np.ndarray:
    """Random unit keys from `seed`: normalise(default_rng(seed).standard_normal((m, dk), float32)).  # [m, dk]"""
    keys = np.random.default_rng(seed).standard_normal((capacity, key_dim), dtype=np.float32)
    return rules.normalize_rows(keys, out=keys)


class Memory:
    """One named memory: four protocol arrays plus bookkeeping, mutated only through `apply`."""

    def __init__(self, name: str, keys: np.ndarray, values: np.ndarray, ages: np.ndarray,
                 item_ids: np.ndarray, written: np.ndarray, version: int = 0, hits: int = 0,
                 misses: int = 0, seed: int = 0, negent: np.ndarray | None = None) -> None:
        self.name = name
        self.keys, self.values, self.ages, self.item_ids = keys, values, ages, item_ids
        self.written = written
        self.capacity, self.key_dim = keys.shape
        self.value_dim = values.shape[1]
        self.version, self.hits, self.misses, self.seed = version, hits, misses, seed
        self.filled = int(written.sum())
        # cached sum p ln p per slot, for KL (saved in snapshots: recomputing costs m*dv logs)
        self.negent = rules.negentropy(values) if negent is None else negent
        self.window: OrderedDict[Any, WindowEntry] = OrderedDict()
        self.searcher: Searcher | None = None
        m = self.capacity
        self._aged = np.empty(m, np.float32)  # scratch buffers reused by every update (no page faults)
        self._scores = np.empty(m, np.float64)
        self._part = np.empty(m, np.float64)
        self._noise = np.empty(m, np.float64)

    @classmethod
    def fresh(cls, name: str, capacity: int, key_dim: int, value_dim: int, seed: int) -> Memory:
        """A new memory as PROTOCOL.md `create` defines it."""
        values = np.full((capacity, value_dim), 1.0 / value_dim, np.float32)
        negent = np.full(capacity, rules.negentropy(values[:1])[0])
        return cls(name, initial_keys(capacity, key_dim, seed), values, np.zeros(capacity, np.float32),
                   np.full(capacity, -1, np.int64), np.zeros(capacity, bool), seed=seed, negent=negent)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.capacity, self.key_dim, self.value_dim

    # ---- reads -------------------------------------------------------------------------------

    def search(self, q_hat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (sims [B,k] f32, slots [B,k] i64) of unit queries."""
        assert self.searcher is not None, "memory has no searcher attached"
        return self.searcher.search(q_hat, k)

    def kl_matrix(self, slots: np.ndarray, log_v: np.ndarray) -> np.ndarray:
        """KL(values[slots[b, j]] || v_b) as float32.  # slots [B, k], log_v [B, dv] -> [B, k]"""
        b_rows, k = slots.shape
        out = np.empty((b_rows, k), np.float32)
        step = max(1, (1 << 19) // max(1, k * self.value_dim))  # ~4 MiB of float64 per block
        for b0 in range(0, b_rows, step):
            s = slots[b0:b0 + step]
            p = self.values[s].astype(np.float64)  # [r, k, dv]
            cross = np.einsum("rkd,rd->rk", p, log_v[b0:b0 + step])
            out[b0:b0 + step] = np.maximum(0.0, self.negent[s] - cross)
        return out

    def gather(self, field: str, slots: np.ndarray) -> np.ndarray:
        """A protocol array gathered at `slots` (a fresh copy)."""
        return getattr(self, field)[slots]

    # ---- planning (no state change) ------------------------------------------------------------

    def plan_update(self, q_hat: np.ndarray, v_norm: np.ndarray, threshold: float, age_noise: float,
                    seed: int | None, item_ids: np.ndarray | None, req_id: Any) -> UpdateEffect:
        """The effect of PROTOCOL.md's update rule for unit queries q_hat [B,dk], targets v_norm [B,dv] f64."""
        b_rows = q_hat.shape[0]
        if b_rows:
            _, nearest = self.search(q_hat, 1)
            nearest = nearest[:, 0]
            kl = rules.kl_rows(self.values[nearest], self.negent[nearest], rules.log_targets(v_norm))
            hit = kl < threshold
        else:
            nearest, hit = np.empty(0, np.int64), np.empty(0, bool)
        hit_rows, miss_rows = np.flatnonzero(hit), np.flatnonzero(~hit)
        if hit_rows.size:
            hit_slots, hit_keys = rules.merge_hit_keys(self.keys, nearest[hit_rows], q_hat[hit_rows])
        else:
            hit_slots, hit_keys = np.empty(0, np.int64), np.empty((0, self.key_dim), np.float32)
        if miss_rows.size:
            np.add(self.ages, np.float32(1), out=self._aged)  # step 1 happens before the choice
            noise = rules.age_noise_vector(self.capacity, age_noise, seed, out=self._noise) if age_noise > 0 else None
            scores = rules.replacement_scores(self._aged, noise, out=self._scores)
            miss_slots = rules.choose_replacements(scores, hit_slots, miss_rows.size, scratch=self._part)
        else:
            miss_slots = np.empty(0, np.int64)
        row_slots = nearest.astype(np.int64, copy=True)
        row_slots[miss_rows] = miss_slots
        miss_ids = item_ids[miss_rows].astype(np.int64) if item_ids is not None else np.full(miss_rows.size, -1, np.int64)
        return UpdateEffect(
            name=self.name, version=self.version + 1, req_id=req_id,
            written_slots=np.concatenate([hit_slots, miss_slots]),
            written_keys=np.concatenate([hit_keys, q_hat[miss_rows]]).astype(np.float32, copy=False),
            miss_slots=miss_slots, miss_values=v_norm[miss_rows].astype(np.float32),
            miss_item_ids=miss_ids, hit=hit, row_slots=row_slots,
        )

    def plan_put(self, slots: np.ndarray, keys_hat: np.ndarray, v_norm: np.ndarray, ages: np.ndarray,
                 item_ids: np.ndarray, req_id: Any) -> PutEffect:
        """The effect of `put` with already-normalised keys and distributions."""
        return PutEffect(self.name, self.version + 1, req_id, slots.astype(np.int64), keys_hat,
                         v_norm.astype(np.float32), ages.astype(np.float32), item_ids.astype(np.int64))

    # ---- applying -------------------------------------------------------------------------------

    def _mark_written(self, slots: np.ndarray) -> None:
        fresh = slots[~self.written[slots]]
        self.filled += int(np.unique(fresh).size)
        self.written[slots] = True

    def _remember(self, req_id: Any, entry: WindowEntry) -> None:
        self.window[req_id] = entry
        self.window.move_to_end(req_id)
        while len(self.window) > IDEMPOTENCY_WINDOW:
            self.window.popitem(last=False)

    def apply(self, effect: UpdateEffect | PutEffect) -> None:
        """Write an update or put effect in place (live and during WAL replay)."""
        if effect.version != self.version + 1:
            raise RuntimeError(f"memory {self.name!r}: effect version {effect.version} after {self.version}")
        if isinstance(effect, UpdateEffect):
            self.ages += np.float32(1)
            ws, ms = effect.written_slots, effect.miss_slots
            self.keys[ws] = effect.written_keys
            self.ages[ws] = 0
            self.values[ms] = effect.miss_values
            self.item_ids[ms] = effect.miss_item_ids
            self.negent[ms] = rules.negentropy(effect.miss_values)
            self._mark_written(ms)
            n_hit = int(np.count_nonzero(effect.hit))
            self.hits += n_hit
            self.misses += int(effect.hit.size) - n_hit
            entry = WindowEntry(effect.version, np.array(effect.hit, bool), effect.row_slots.astype(np.int32))
        else:
            ws = effect.slots
            self.keys[ws] = effect.keys
            self.values[ws] = effect.values
            self.ages[ws] = effect.ages
            self.item_ids[ws] = effect.item_ids
            self.negent[ws] = rules.negentropy(effect.values)
            self._mark_written(ws)
            entry = WindowEntry(effect.version)
        self.version = effect.version
        self._remember(effect.req_id, entry)
        if self.searcher is not None:
            self.searcher.keys_written(ws)

    def export(self) -> list[tuple[str, np.ndarray]]:
        """Copies of the four protocol arrays (copies: replies are sent after later writes)."""
        return [("keys", self.keys.copy()), ("values", self.values.copy()), ("ages", self.ages.copy()),
                ("item_ids", self.item_ids.copy())]


class MemoryStore:
    """All named memories of one server, their search backend and the total size limit."""

    def __init__(self, backend: str = "faiss-cpu", max_memory_bytes: int | None = None) -> None:
        self.backend = backend
        self.max_memory_bytes = max_memory_bytes
        self.memories: dict[str, Memory] = {}
        self.attach_searchers = True  # False during WAL replay: attach once at the end

    def get(self, name: str) -> Memory:
        """The memory `name` or NoSuchMemory."""
        mem = self.memories.get(name)
        if mem is None:
            raise NoSuchMemory(f"memory {name!r} does not exist")
        return mem

    def total_nbytes(self) -> int:
        return sum(memory_nbytes(*m.shape) for m in self.memories.values())

    def plan_create(self, name: str, capacity: int, key_dim: int, value_dim: int, seed: int) -> CreateEffect | None:
        """None when the same shape exists (create is idempotent); Exists or TooLarge when refused."""
        mem = self.memories.get(name)
        if mem is not None:
            if mem.shape == (capacity, key_dim, value_dim):
                return None
            raise Exists(
                f"memory {name!r} exists with capacity={mem.capacity}, key_dim={mem.key_dim}, "
                f"value_dim={mem.value_dim}; requested {capacity}, {key_dim}, {value_dim}"
            )
        if capacity > MAX_CAPACITY:
            raise TooLarge(f"capacity {capacity} exceeds the maximum {MAX_CAPACITY}")
        need = memory_nbytes(capacity, key_dim, value_dim)
        if self.max_memory_bytes is not None and self.total_nbytes() + need > self.max_memory_bytes:
            raise TooLarge(
                f"create {name!r} needs {need} bytes; with the {self.total_nbytes()} bytes held that exceeds "
                f"--max-memory-bytes {self.max_memory_bytes}"
            )
        return CreateEffect(name, capacity, key_dim, value_dim, seed)

    def attach(self, mem: Memory) -> None:
        """Give `mem` a searcher of the store's backend."""
        mem.searcher = make_searcher(self.backend, mem.keys)

    def add(self, mem: Memory) -> None:
        """Insert a loaded memory (snapshot recovery)."""
        self.memories[mem.name] = mem
        if self.attach_searchers:
            self.attach(mem)

    def attach_all(self) -> None:
        """Attach searchers to every memory (after replay), and attach future ones at once."""
        self.attach_searchers = True
        for mem in self.memories.values():
            if mem.searcher is None:
                self.attach(mem)

    def apply(self, effect: Effect) -> None:
        """Apply any effect: create, drop, update or put."""
        if isinstance(effect, CreateEffect):
            if effect.name in self.memories:
                raise RuntimeError(f"create of existing memory {effect.name!r}")
            self.add(Memory.fresh(effect.name, effect.capacity, effect.key_dim, effect.value_dim, effect.seed))
        elif isinstance(effect, DropEffect):
            mem = self.memories.pop(effect.name)
            if mem.searcher is not None:
                mem.searcher.close()
        else:
            self.get(effect.name).apply(effect)

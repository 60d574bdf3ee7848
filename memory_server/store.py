"""MemoryStore: the named memories (keys/values/ages/item_ids + search) and their state transitions.

Mutations are split in three: `plan_*` computes an effect from the current state without changing it,
`check` verifies everything applying it relies on, and `apply` = `prepare` (every allocation) then
`commit` (in-place writes that cannot fail). The engine logs an effect after `check` and before
`prepare`, and WAL replay runs `check` + `apply` too, so recovery reproduces the live state bit for
bit and refuses a record it cannot apply instead of crashing on it. One thread owns a store: no locks.

Accounting: `layout()` lists every array a memory holds, `Memory.nbytes()` adds its idempotency window,
its searcher's own structures (`Searcher.nbytes()`) and a fixed overhead (at least MIN_MEMORY_BYTES),
and `planned_nbytes()` gives the same figure before a `create`, so `--max-memory-bytes` bounds what the
process really holds (tested against its RSS). A new array or index type adds one line to `layout()`
or to its searcher's `nbytes()`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import rules
from .backends import IndexOptions, Searcher, make_searcher, searcher_nbytes
from .effects import CreateEffect, DropEffect, Effect, PutEffect, UpdateEffect
from .protocol import (
    DEFAULT_MAX_MEMORIES,
    IDEMPOTENCY_WINDOW,
    Exists,
    NoSuchMemory,
    TooLarge,
    check_memory_name,
    short_repr,
    valid_request_id,
)

MAX_CAPACITY = 2**31 - 1  # slots are stored as int32 in the idempotency window
MIN_MEMORY_BYTES = 64 * 1024  # PROTOCOL.md Limits: each memory counts at least this
OBJECT_BYTES = 8 * 1024  # the Python objects of a memory (Memory, dicts, searcher object), measured < 4 KiB
# Python objects of one remembered reply (OrderedDict node, WindowEntry, two small ndarrays), measured
# with tracemalloc at ~460 bytes for an update and ~220 for a put, plus its id and 5 bytes per row.
WINDOW_ENTRY_BYTES = 512

PERSISTENT_ARRAYS = ("keys", "values", "ages", "item_ids", "written", "negent")  # saved in snapshots
VALUE_DTYPE_CHOICES = ("float32", "float16")  # --value-dtype: how `values` are held (replies stay float32)
SCRATCH_ARRAYS = ("aged", "scores", "part", "noise")  # per-slot buffers reused by every update


class EffectInvalid(ValueError):
    """An effect that cannot be applied to the store (a bug when planned live, corruption in a log)."""


def layout(capacity: int, key_dim: int, value_dim: int,
           value_dtype: str = "float32") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array a memory holds: the protocol arrays, bookkeeping and scratch."""
    m = capacity
    return {
        "keys": ((m, key_dim), np.dtype(np.float32)),
        "values": ((m, value_dim), np.dtype(value_dtype)),
        "ages": ((m,), np.dtype(np.float32)),
        "item_ids": ((m,), np.dtype(np.int64)),
        "written": ((m,), np.dtype(bool)),  # slot written at least once (for `filled`)
        "negent": ((m,), np.dtype(np.float64)),  # cached sum p ln p per slot, for KL
        "aged": ((m,), np.dtype(np.float32)),
        "scores": ((m,), np.dtype(np.float64)),
        "part": ((m,), np.dtype(np.float64)),
        "noise": ((m,), np.dtype(np.float64)),
    }


def arrays_nbytes(capacity: int, key_dim: int, value_dim: int, value_dtype: str = "float32") -> int:
    """Bytes of every array in `layout()`."""
    spec = layout(capacity, key_dim, value_dim, value_dtype)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in spec.values())


def planned_nbytes(capacity: int, key_dim: int, value_dim: int, backend: str, opts: IndexOptions | None = None,
                   value_dtype: str = "float32") -> int:
    """What a new memory of this shape will hold (Memory.nbytes() of a fresh one), checked before a create."""
    held = arrays_nbytes(capacity, key_dim, value_dim, value_dtype) + searcher_nbytes(backend, capacity, key_dim, opts)
    return max(MIN_MEMORY_BYTES, held + OBJECT_BYTES)


def memory_nbytes(capacity: int, key_dim: int, value_dim: int) -> int:
    """Bytes of a memory's four protocol arrays (keys, values, ages, item_ids): what `export` returns."""
    return capacity * (4 * key_dim + 4 * value_dim + 4 + 8)


def window_entry_nbytes(req_id: Any, rows: int) -> int:
    """Accounted bytes of one remembered reply."""
    id_bytes = len(req_id.encode("utf-8", "surrogatepass")) if isinstance(req_id, str) else 8
    return WINDOW_ENTRY_BYTES + id_bytes + 5 * rows


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

    @property
    def rows(self) -> int:
        return 0 if self.hit is None else int(self.hit.size)


def initial_keys(capacity: int, key_dim: int, seed: int) -> np.ndarray:
    """Random unit keys from `seed`: normalise(default_rng(seed).standard_normal((m, dk), float32)).  # [m, dk]"""
    keys = np.random.default_rng(seed).standard_normal((capacity, key_dim), dtype=np.float32)
    return rules.normalize_rows(keys, out=keys)


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise EffectInvalid(message)


def _expect_array(name: str, a: Any, dtype: Any, shape: tuple[int | None, ...]) -> None:
    ok = isinstance(a, np.ndarray) and a.dtype == np.dtype(dtype) and a.ndim == len(shape) and all(
        want is None or got == want for got, want in zip(a.shape, shape, strict=True))
    got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
    _expect(ok, f"{name} is {got}, expected {np.dtype(dtype)}{['*' if s is None else s for s in shape]}")


def _expect_slots(name: str, a: np.ndarray, capacity: int) -> None:
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        _expect(lo >= 0 and hi < capacity, f"{name} holds slot {lo if lo < 0 else hi}, outside [0, {capacity})")


class Memory:
    """One named memory: the arrays of `layout()` plus bookkeeping, mutated only through `apply`."""

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
        self.window_bytes = 0
        self.searcher: Searcher | None = None
        self.index_state: np.ndarray | None = None  # a snapshotted index, until a searcher adopts it
        self.pending: list[np.ndarray] = []  # slots written while no searcher was attached (log replay)
        spec = layout(self.capacity, self.key_dim, self.value_dim)
        # scratch buffers reused by every update (no page faults, and counted in nbytes())
        self._aged, self._scores, self._part, self._noise = (np.empty(*spec[n]) for n in SCRATCH_ARRAYS)

    @classmethod
    def fresh(cls, name: str, capacity: int, key_dim: int, value_dim: int, seed: int,
              value_dtype: str = "float32") -> Memory:
        """A new memory as PROTOCOL.md `create` defines it (values held as `value_dtype`)."""
        values = np.full((capacity, value_dim), 1.0 / value_dim, np.dtype(value_dtype))
        negent = np.full(capacity, rules.negentropy(values[:1])[0])
        return cls(name, initial_keys(capacity, key_dim, seed), values, np.zeros(capacity, np.float32),
                   np.full(capacity, -1, np.int64), np.zeros(capacity, bool), seed=seed, negent=negent)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.capacity, self.key_dim, self.value_dim

    def nbytes(self) -> int:
        """Every byte this memory holds: arrays, scratch, idempotency window, searcher, object overhead."""
        searcher = self.searcher.nbytes() if self.searcher is not None else 0
        held = arrays_nbytes(*self.shape, self.values.dtype.name) + searcher + OBJECT_BYTES
        return max(MIN_MEMORY_BYTES, held) + self.window_bytes

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
            # einsum casts the held values to float64 as it goes: the same products and sums, bit for bit,
            # as an explicit float64 copy first, a third faster (no [r, k, dv] float64 temporary).
            cross = np.einsum("rkd,rd->rk", self.values[s], log_v[b0:b0 + step])
            out[b0:b0 + step] = np.maximum(0.0, self.negent[s] - cross)
        return out

    def gather(self, field: str, slots: np.ndarray) -> np.ndarray:
        """A protocol array gathered at `slots` (a fresh copy; values as float32 whatever they are held as)."""
        out = getattr(self, field)[slots]
        return out.astype(np.float32) if field == "values" and out.dtype != np.float32 else out

    def row_bytes(self, fields: Any) -> int:
        """Bytes per gathered slot of the protocol arrays named in `fields`."""
        per = {"keys": 4 * self.key_dim, "values": 4 * self.value_dim, "ages": 4, "item_ids": 8}
        return sum(per[f] for f in fields)

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
            written_slots=np.concatenate([hit_slots, miss_slots]).astype(np.int64, copy=False),
            written_keys=np.concatenate([hit_keys, q_hat[miss_rows]]).astype(np.float32, copy=False),
            miss_slots=miss_slots, miss_values=v_norm[miss_rows].astype(np.float32),
            miss_item_ids=miss_ids, hit=hit, row_slots=row_slots,
        )

    def plan_put(self, slots: np.ndarray, keys_hat: np.ndarray, v_norm: np.ndarray, ages: np.ndarray,
                 item_ids: np.ndarray, req_id: Any) -> PutEffect:
        """The effect of `put` with already-normalised keys and distributions."""
        return PutEffect(self.name, self.version + 1, req_id, slots.astype(np.int64), keys_hat,
                         v_norm.astype(np.float32), ages.astype(np.float32), item_ids.astype(np.int64))

    # ---- checking and applying -------------------------------------------------------------------

    def check(self, effect: UpdateEffect | PutEffect) -> None:
        """EffectInvalid unless `effect` applies to this memory exactly as planned (shapes, slots, version)."""
        _expect(effect.version == self.version + 1,
                f"memory {self.name!r}: effect version {effect.version} does not follow version {self.version}")
        _expect(valid_request_id(effect.req_id), f"effect request id {short_repr(effect.req_id)} is not a valid id")
        m, dk, dv = self.shape
        if isinstance(effect, UpdateEffect):
            b_rows = effect.hit.shape[0] if isinstance(effect.hit, np.ndarray) else -1
            _expect_array("hit", effect.hit, bool, (None,))
            _expect_array("row_slots", effect.row_slots, np.int64, (b_rows,))
            n_miss = int(b_rows - np.count_nonzero(effect.hit))
            _expect_array("miss_slots", effect.miss_slots, np.int64, (n_miss,))
            _expect_array("miss_values", effect.miss_values, np.float32, (n_miss, dv))
            _expect_array("miss_item_ids", effect.miss_item_ids, np.int64, (n_miss,))
            _expect_array("written_slots", effect.written_slots, np.int64, (None,))
            u = effect.written_slots.shape[0]
            _expect_array("written_keys", effect.written_keys, np.float32, (u, dk))
            _expect(u >= n_miss and np.array_equal(effect.written_slots[u - n_miss:], effect.miss_slots),
                    "written_slots must end with miss_slots")
            for name in ("written_slots", "row_slots"):
                _expect_slots(name, getattr(effect, name), m)
            slots, keys, values = effect.written_slots, effect.written_keys, effect.miss_values
        else:
            _expect_array("slots", effect.slots, np.int64, (None,))
            n = effect.slots.shape[0]
            _expect_array("keys", effect.keys, np.float32, (n, dk))
            _expect_array("values", effect.values, np.float32, (n, dv))
            _expect_array("ages", effect.ages, np.float32, (n,))
            _expect_array("item_ids", effect.item_ids, np.int64, (n,))
            _expect_slots("slots", effect.slots, m)
            _expect(bool(np.isfinite(effect.ages).all()) and not (effect.ages < 0).any(),
                    "ages must be finite and >= 0")
            slots, keys, values = effect.slots, effect.keys, effect.values
        _expect(np.unique(slots).size == slots.size, "written slots repeat")
        _expect(bool(np.isfinite(keys).all() and np.isfinite(values).all()), "keys or values hold NaN or Inf")
        _expect(not (values < 0).any(), "values hold a negative entry")

    def prepare(self, effect: UpdateEffect | PutEffect) -> tuple[Any, ...]:
        """Every allocation `commit` needs (a failure here leaves the memory untouched)."""
        # negent of the values as held (float16 rounds them), so KL is computed from one consistent p
        held = self.values.dtype
        if isinstance(effect, UpdateEffect):
            ms = effect.miss_slots
            entry = WindowEntry(effect.version, np.array(effect.hit, bool), effect.row_slots.astype(np.int32))
            n_hit = int(np.count_nonzero(effect.hit))
            return ms, rules.negentropy(effect.miss_values.astype(held)), self._fresh_count(ms), entry, n_hit
        ws = effect.slots
        return ws, rules.negentropy(effect.values.astype(held)), self._fresh_count(ws), WindowEntry(effect.version), 0

    def _fresh_count(self, slots: np.ndarray) -> int:
        return int(np.unique(slots[~self.written[slots]]).size)

    def commit(self, effect: UpdateEffect | PutEffect, prepared: tuple[Any, ...]) -> None:
        """In-place writes of a checked, prepared effect (nothing here allocates more than a few indices)."""
        written, negent, fresh, entry, n_hit = prepared
        if isinstance(effect, UpdateEffect):
            self.ages += np.float32(1)
            ws = effect.written_slots
            self.keys[ws] = effect.written_keys
            self.ages[ws] = 0
            self.values[written] = effect.miss_values
            self.item_ids[written] = effect.miss_item_ids
            self.hits += n_hit
            self.misses += int(effect.hit.size) - n_hit
        else:
            ws = written
            self.keys[ws] = effect.keys
            self.values[ws] = effect.values
            self.ages[ws] = effect.ages
            self.item_ids[ws] = effect.item_ids
        self.negent[written] = negent
        self.written[written] = True
        self.filled += fresh
        self.version = effect.version
        self._remember(effect.req_id, entry)
        if self.searcher is not None:
            self.searcher.keys_written(ws)
        else:
            self.pending.append(np.array(ws, np.int64))

    def apply(self, effect: UpdateEffect | PutEffect) -> None:
        """check + prepare + commit (WAL replay and tests)."""
        self.check(effect)
        self.commit(effect, self.prepare(effect))

    def _remember(self, req_id: Any, entry: WindowEntry) -> None:
        old = self.window.pop(req_id, None)
        if old is not None:
            self.window_bytes -= window_entry_nbytes(req_id, old.rows)
        self.window[req_id] = entry
        self.window_bytes += window_entry_nbytes(req_id, entry.rows)
        while len(self.window) > IDEMPOTENCY_WINDOW:
            self.forget_oldest()

    def forget_oldest(self) -> None:
        """Drop the oldest remembered reply."""
        req_id, entry = self.window.popitem(last=False)
        self.window_bytes -= window_entry_nbytes(req_id, entry.rows)

    def export(self) -> list[tuple[str, np.ndarray]]:
        """Copies of the four protocol arrays (copies: replies are sent after later writes)."""
        return [("keys", self.keys.copy()), ("values", self.values.astype(np.float32)), ("ages", self.ages.copy()),
                ("item_ids", self.item_ids.copy())]


class MemoryStore:
    """All named memories of one server, their search backend and the limits on their number and bytes."""

    def __init__(self, backend: str = "faiss-cpu", max_memory_bytes: int | None = None,
                 max_memories: int = DEFAULT_MAX_MEMORIES, index: IndexOptions | None = None,
                 value_dtype: str = "float32") -> None:
        if value_dtype not in VALUE_DTYPE_CHOICES:
            raise ValueError(f"unknown value dtype {value_dtype!r}; choose one of {VALUE_DTYPE_CHOICES}")
        self.backend = backend
        self.index = index or IndexOptions()
        self.value_dtype = value_dtype
        self.max_memory_bytes = max_memory_bytes
        self.max_memories = max_memories
        self.memories: dict[str, Memory] = {}
        self.attach_searchers = True  # False during WAL replay: attach once at the end
        self.window_evictions = 0  # replies forgotten early because of --max-memory-bytes
        self._fixed_bytes = 0  # sum of planned() over the memories
        self._window_bytes = 0  # sum of their windows' bytes

    def get(self, name: str) -> Memory:
        """The memory `name` or NoSuchMemory."""
        mem = self.memories.get(name)
        if mem is None:
            raise NoSuchMemory(f"memory {name!r} does not exist")
        return mem

    def total_nbytes(self) -> int:
        """Every byte held for all memories (Memory.nbytes summed), kept up to date incrementally."""
        return self._fixed_bytes + self._window_bytes

    def planned(self, mem: Memory) -> int:
        """A memory's bytes without its window (fixed for its lifetime)."""
        return planned_nbytes(*mem.shape, self.backend, self.index, mem.values.dtype.name)

    def check_create(self, name: str, capacity: int, key_dim: int, value_dim: int) -> None:
        """TooLarge when a new memory of this shape would pass --max-memories or --max-memory-bytes."""
        if capacity > MAX_CAPACITY:
            raise TooLarge(f"capacity {capacity} exceeds the maximum {MAX_CAPACITY}", limit="capacity")
        if len(self.memories) >= self.max_memories:
            raise TooLarge(f"create {name!r}: the server holds {len(self.memories)} memories, "
                           f"--max-memories is {self.max_memories}", limit="memories")
        need = planned_nbytes(capacity, key_dim, value_dim, self.backend, self.index, self.value_dtype)
        held = self.total_nbytes()
        if self.max_memory_bytes is not None and held + need > self.max_memory_bytes:
            raise TooLarge(f"create {name!r} needs {need} bytes (arrays, scratch, search structures); with the "
                           f"{held} bytes held that exceeds --max-memory-bytes {self.max_memory_bytes}",
                           limit="memory_bytes")

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
        self.check_create(name, capacity, key_dim, value_dim)
        return CreateEffect(name, capacity, key_dim, value_dim, seed)

    def attach(self, mem: Memory) -> None:
        """Give `mem` a searcher of the store's backend (adopting a snapshotted index and replayed writes)."""
        pending = np.concatenate(mem.pending) if mem.pending else None
        mem.searcher = make_searcher(self.backend, mem.keys, self.index, mem.written, mem.index_state, pending)
        mem.index_state, mem.pending = None, []

    def add(self, mem: Memory) -> None:
        """Insert a loaded memory (snapshot recovery)."""
        if self.attach_searchers:
            self.attach(mem)
        self._insert(mem)

    def _insert(self, mem: Memory) -> None:
        self.memories[mem.name] = mem
        self._fixed_bytes += self.planned(mem)
        self._window_bytes += mem.window_bytes

    def attach_all(self) -> None:
        """Attach searchers to every memory (after replay), and attach future ones at once."""
        self.attach_searchers = True
        for mem in self.memories.values():
            if mem.searcher is None:
                self.attach(mem)

    # ---- effects --------------------------------------------------------------------------------

    def check(self, effect: Effect) -> None:
        """EffectInvalid (or TooLarge for a create over the limits) unless `effect` applies as planned."""
        if isinstance(effect, CreateEffect):
            try:
                check_memory_name(effect.name)
            except Exception as exc:
                raise EffectInvalid(f"create of an invalid memory name: {exc}") from None
            _expect(effect.name not in self.memories, f"create of existing memory {effect.name!r}")
            for field in ("capacity", "key_dim", "value_dim"):
                _expect(1 <= getattr(effect, field) <= MAX_CAPACITY, f"create {field} {getattr(effect, field)} "
                        f"is outside [1, {MAX_CAPACITY}]")
            _expect(0 <= effect.seed < 2**63, f"create seed {effect.seed} is outside [0, 2**63)")
            self.check_create(effect.name, effect.capacity, effect.key_dim, effect.value_dim)
        elif isinstance(effect, DropEffect):
            _expect(effect.name in self.memories, f"drop of memory {effect.name!r}, which does not exist")
        else:
            mem = self.memories.get(effect.name)
            _expect(mem is not None, f"{type(effect).__name__} for memory {effect.name!r}, which does not exist")
            mem.check(effect)

    def prepare(self, effect: Effect) -> Any:
        """Every allocation of applying a checked effect; a failure here changes nothing."""
        if isinstance(effect, CreateEffect):
            mem = Memory.fresh(effect.name, effect.capacity, effect.key_dim, effect.value_dim, effect.seed,
                               self.value_dtype)
            if self.attach_searchers:
                self.attach(mem)
            return mem
        if isinstance(effect, DropEffect):
            return None
        return self.memories[effect.name].prepare(effect)

    def commit(self, effect: Effect, prepared: Any) -> None:
        """The in-place part of applying a checked, prepared effect."""
        if isinstance(effect, CreateEffect):
            self._insert(prepared)
        elif isinstance(effect, DropEffect):
            mem = self.memories.pop(effect.name)
            self._fixed_bytes -= self.planned(mem)
            self._window_bytes -= mem.window_bytes
            if mem.searcher is not None:
                mem.searcher.close()
        else:
            mem = self.memories[effect.name]
            before = mem.window_bytes
            mem.commit(effect, prepared)
            self._window_bytes += mem.window_bytes - before
            self._shed_window(mem)

    def apply(self, effect: Effect) -> None:
        """check + prepare + commit any effect: create, drop, update or put (replay and tests)."""
        self.check(effect)
        self.commit(effect, self.prepare(effect))

    def _shed_window(self, mem: Memory) -> None:
        """Over --max-memory-bytes, forget the oldest replies of the memory that just grew its window.

        A mutation is never refused for its window (the memory would become read-only for good); the
        idempotency window of that memory gets shorter instead, counted in `window_evictions`. Replay
        sheds the same entries, so the window after a restart is the live one.
        """
        if self.max_memory_bytes is None:
            return
        while self.total_nbytes() > self.max_memory_bytes and len(mem.window) > 1:
            before = mem.window_bytes
            mem.forget_oldest()
            self._window_bytes -= before - mem.window_bytes
            self.window_evictions += 1

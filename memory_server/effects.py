"""Effects of mutating requests: what the write-ahead log records and what replay re-applies.

An effect holds the slots written and their new contents (never a random draw), plus the reply that
the idempotency window must give again. Each effect converts to and from a WAL record: a msgpack
header map plus named arrays, in the same array-spec format as the wire protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .protocol import DTYPES, short_repr, wire_dtype_name


@dataclass
class CreateEffect:
    """A new memory `name` from `seed` (replay regenerates the same keys)."""

    name: str
    capacity: int
    key_dim: int
    value_dim: int
    seed: int


@dataclass
class DropEffect:
    """Memory `name` removed with its idempotency window."""

    name: str


@dataclass
class UpdateEffect:
    """One applied `update`: all ages +1, then the written slots (hit merges and miss writes)."""

    name: str
    version: int
    req_id: Any
    written_slots: np.ndarray  # [u] int64: hit slots (ascending) then miss slots (row order)
    written_keys: np.ndarray  # [u, dk] float32, unit rows
    miss_slots: np.ndarray  # [M] int64
    miss_values: np.ndarray  # [M, dv] float32, rows summing to 1
    miss_item_ids: np.ndarray  # [M] int64
    hit: np.ndarray  # [B] bool (the reply)
    row_slots: np.ndarray  # [B] int64 (the reply)


@dataclass
class PutEffect:
    """One applied `put`: rows written verbatim (already normalised)."""

    name: str
    version: int
    req_id: Any
    slots: np.ndarray  # [n] int64
    keys: np.ndarray  # [n, dk] float32
    values: np.ndarray  # [n, dv] float32
    ages: np.ndarray  # [n] float32
    item_ids: np.ndarray  # [n] int64


Effect = CreateEffect | DropEffect | UpdateEffect | PutEffect

_UPDATE_ARRAYS = ("written_slots", "written_keys", "miss_slots", "miss_values", "miss_item_ids", "hit", "row_slots")
_PUT_ARRAYS = ("slots", "keys", "values", "ages", "item_ids")


def to_record(effect: Effect) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """(header, [(name, array)]) of a WAL record for `effect`."""
    if isinstance(effect, CreateEffect):
        return {"t": "create", "m": effect.name, "capacity": effect.capacity, "key_dim": effect.key_dim,
                "value_dim": effect.value_dim, "seed": effect.seed}, []
    if isinstance(effect, DropEffect):
        return {"t": "drop", "m": effect.name}, []
    if isinstance(effect, UpdateEffect):
        names = _UPDATE_ARRAYS
        kind = "update"
    else:
        names = _PUT_ARRAYS
        kind = "put"
    header = {"t": kind, "m": effect.name, "ver": effect.version, "id": effect.req_id}
    return header, [(n, getattr(effect, n)) for n in names]


def array_specs(arrays: list[tuple[str, np.ndarray]]) -> list[list[Any]]:
    """[name, dtype, shape] per array, as in the wire header."""
    return [[n, wire_dtype_name(a), list(a.shape)] for n, a in arrays]


def _field(header: dict[str, Any], key: str, kind: type) -> Any:
    x = header.get(key)
    if not isinstance(x, kind) or isinstance(x, bool):
        raise ValueError(f"record field {key!r} is {type(x).__name__}, expected {kind.__name__}")
    return x


def _arrays(arrays: dict[str, np.ndarray], names: tuple[str, ...]) -> list[np.ndarray]:
    missing = [n for n in names if n not in arrays]
    if missing or len(arrays) != len(names):
        raise ValueError(f"record arrays {sorted(arrays)} are not {sorted(names)}")
    return [arrays[n] for n in names]


def from_record(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Effect:
    """The effect of a decoded WAL record; ValueError if the record is not one we write.

    Only the record's form is checked here; whether it applies to the store is `MemoryStore.check`.
    """
    kind = header.get("t")
    name = _field(header, "m", str)
    if kind == "create":
        return CreateEffect(name, *(_field(header, k, int) for k in ("capacity", "key_dim", "value_dim", "seed")))
    if kind == "drop":
        return DropEffect(name)
    if kind in ("update", "put"):
        req_id = header.get("id")
        if not isinstance(req_id, (str, int)) or isinstance(req_id, bool):
            raise ValueError(f"record id is {type(req_id).__name__}")
        names = _UPDATE_ARRAYS if kind == "update" else _PUT_ARRAYS
        cls = UpdateEffect if kind == "update" else PutEffect
        return cls(name, _field(header, "ver", int), req_id, *_arrays(arrays, names))
    raise ValueError(f"unknown WAL record type {short_repr(kind)}")


def decode_record_arrays(specs: Any, payload: memoryview, offset: int) -> dict[str, np.ndarray]:
    """Views over the array bytes that follow a record header at `offset` in `payload`."""
    if not isinstance(specs, list):
        raise ValueError(f"record 'arrays' is {type(specs).__name__}, not a list")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str) and spec[1] in DTYPES
                and isinstance(spec[2], list) and all(isinstance(d, int) and d >= 0 for d in spec[2])):
            raise ValueError(f"record array spec {short_repr(spec)} is not [name, dtype, shape]")
        name, dtype_name, shape = spec
        dtype = DTYPES[dtype_name]
        n = dtype.itemsize
        for d in shape:
            n *= d
        if offset + n > len(payload) or name in out:
            raise ValueError(f"record array {name!r} runs past the record end or repeats")
        out[name] = np.frombuffer(payload[offset:offset + n], dtype=dtype).reshape(shape)
        offset += n
    if offset != len(payload):
        raise ValueError(f"record has {len(payload) - offset} trailing bytes")
    return out

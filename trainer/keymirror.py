"""KeyMirror: this rank's exact copy of the memory's keys, so phase-1 queries need not carry them.

The circle loss needs the top-k keys of every query ([B, k, dk]: 4 MiB a step at B 8, k 256, dk 512);
shipping them from the server costs more than the search. A rank that is the memory's only writer
knows every change to the keys: its own updates, whose replies say which rows hit (slot key merged
with the query) and which slots the misses took (slot key = the query). Replaying those replies with
the server's own arithmetic (memory_server.rules) keeps the copy equal to the server's keys bit for
bit, and a query then asks only for slots, sims and KL.

With a `replica` (memory_server.replica, `memory.local_queries`) the copy is the whole memory and
the phase-1 query itself is answered here, by the server's code on the same backend: the server then
sees only the updates (it still plans each one: its search and the replacement choice), and a query
costs no round trip. Each answer is exactly the server's at the version after this rank's last update.

Exactness is checked, never assumed: each query reply's `version` (or, with a replica, each update
reply's) must follow the mirror's (anything else means another client wrote, and the mirror is dropped
for good), and every `VERIFY_EVERY` updates a sample of slots is compared with `get` (a server holding
keys at another precision fails that and is dropped too); a replica's first query and every
`VERIFY_EVERY`-th is also asked of the server and the two answers compared. A dropped mirror costs
nothing but speed: the queries go to the server and carry the keys again.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from memory_server import rules
from memory_server.replica import Replica, ReplicaUnavailable

log = logging.getLogger(__name__)

SYNC_ROWS = 8192  # slots per `get` when the mirror is first filled (~27 MB replies at dk 512, dv 313)

VERIFY_EVERY = 256  # updates between spot checks against the server
VERIFY_ROWS = 64


class KeyMirror:
    """Keys [m, dk] float32 on the host (the truth) and, for a CUDA device, a device copy kept in step."""

    def __init__(self, client, capacity: int, device: torch.device, seed: int = 0,
                 replica: Replica | None = None, rows_per_get: int = SYNC_ROWS) -> None:
        # rows_per_get: what the server's limits allow per `get` (memory_server.client.rows_per_get)
        rows_per_get = min(SYNC_ROWS, rows_per_get)
        self.client = client
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.replica = replica
        self.updates = self.queries = 0
        if replica is not None:  # its keys array is the mirror's, written in place by each replayed update
            self.keys, self.version = replica.mem.keys, replica.version
            self.device_keys = torch.from_numpy(self.keys) if device.type == "cpu" else torch.from_numpy(self.keys).to(device)
            return
        first = client.get(np.arange(min(rows_per_get, capacity), dtype=np.int64))
        version = first["version"]
        parts = [first["keys"]]
        for start in range(rows_per_get, capacity, rows_per_get):
            part = client.get(np.arange(start, min(start + rows_per_get, capacity), dtype=np.int64))
            if part["version"] != version:
                raise MirrorStale(f"the memory changed while its keys were read (version {version} -> "
                                  f"{part['version']})")
            parts.append(part["keys"])
        self.keys = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        self.version = int(version)
        # On the CPU the tensor shares the array's memory; on a GPU only written rows cross the bus.
        self.device_keys = torch.from_numpy(self.keys) if device.type == "cpu" else torch.from_numpy(self.keys).to(device)

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        """Keys at `slots` [B, k] as a [B, k, dk] tensor on the device (what a `keys` field would hold)."""
        index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        return self.device_keys.index_select(0, index.reshape(-1)).view(*slots.shape, self.keys.shape[1])

    def query(self, q: np.ndarray, k: int, targets: np.ndarray) -> dict:
        """A phase-1 query answered by the replica (the server's answer at this version).

        The first and every VERIFY_EVERY-th query is asked of the server too: MirrorStale unless the two
        answers are equal to the bit."""
        assert self.replica is not None, "query() needs a replica"
        local = self.replica.query(q, k=k, targets=targets)
        self.queries += 1
        if self.queries % VERIFY_EVERY == 1:
            remote = self.client.query(q, k=k, targets=targets)
            if int(remote["version"]) != self.version:
                raise MirrorStale(f"query reply at version {remote['version']}, the mirror at {self.version}")
            for name in ("slots", "sims", "kl"):
                if not np.array_equal(local[name], remote[name]):
                    raise MirrorStale(f"the replica's query answer differs from the server's ({name})")
        return local

    def apply_update(self, q: np.ndarray, reply: dict, v: np.ndarray | None = None,
                     item_ids: np.ndarray | None = None) -> None:
        """Replay one `update` of queries `q` whose reply is `reply` (PROTOCOL.md's update rule, steps 4-5);
        a replica also needs the update's targets `v` and `item_ids`.

        MirrorStale when the reply's version is not the next one (another client wrote in between)."""
        if int(reply["version"]) != self.version + 1:
            raise MirrorStale(f"update reply at version {reply['version']}, the mirror at {self.version}")
        if self.replica is not None:
            try:
                rows = self.replica.follow_update(q, v, item_ids, reply)
            except ReplicaUnavailable as exc:
                raise MirrorStale(str(exc)) from None
            self._updated(rows)
            return
        q_hat = rules.normalize_rows(np.ascontiguousarray(q, dtype=np.float32))  # as the server decodes it
        hit, slots = np.asarray(reply["hit"], bool), np.asarray(reply["slots"], np.int64)
        written = [np.empty(0, np.int64)]
        if hit.any():
            hit_slots, hit_keys = rules.merge_hit_keys(self.keys, slots[hit], q_hat[hit])
            self.keys[hit_slots] = hit_keys
            written.append(hit_slots)
        if (~hit).any():
            self.keys[slots[~hit]] = q_hat[~hit]
            written.append(slots[~hit])
        self._updated(np.concatenate(written))

    def _updated(self, written: np.ndarray) -> None:
        """After an update wrote the keys at `written`: the device copy, the version, the periodic check."""
        if self.device.type != "cpu":  # on the CPU the tensor is the array itself
            rows = np.unique(written)
            index = torch.from_numpy(rows).to(self.device)
            self.device_keys.index_copy_(0, index, torch.from_numpy(self.keys[rows]).to(self.device))
        self.version += 1
        self.updates += 1
        if self.updates % VERIFY_EVERY == 0:
            self.verify()

    def verify(self) -> None:
        """MirrorStale unless a random sample of slots (and the version) equals the server's."""
        slots = self.rng.choice(self.keys.shape[0], size=min(VERIFY_ROWS, self.keys.shape[0]), replace=False)
        got = self.client.get(slots.astype(np.int64))
        if int(got["version"]) != self.version:
            raise MirrorStale(f"server at version {got['version']}, the mirror at {self.version}")
        bad = np.flatnonzero((got["keys"] != self.keys[slots]).any(axis=1))
        if bad.size:
            raise MirrorStale(f"slot {int(slots[bad[0]])}'s key differs from the server's "
                              f"({bad.size} of {slots.size} sampled slots)")
        if self.replica is not None:
            mine = self.replica.get(slots.astype(np.int64))
            for name in ("values", "ages", "item_ids"):
                bad = np.flatnonzero((got[name] != mine[name]).reshape(slots.size, -1).any(axis=1))
                if bad.size:
                    raise MirrorStale(f"slot {int(slots[bad[0]])}'s {name} differ from the server's "
                                      f"({bad.size} of {slots.size} sampled slots)")


class MirrorStale(RuntimeError):
    """The mirror no longer equals the server's keys; the caller drops it and asks for keys again."""

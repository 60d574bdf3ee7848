"""KeyMirror: this rank's exact copy of the memory's keys, so phase-1 queries need not carry them.

The circle loss needs the top-k keys of every query ([B, k, dk]: 4 MiB a step at B 8, k 256, dk 512);
shipping them from the server costs more than the search. A rank that is the memory's only writer
knows every change to the keys: its own updates, whose replies say which rows hit (slot key merged
with the query) and which slots the misses took (slot key = the query). Replaying those replies with
the server's own arithmetic (memory_server.rules) keeps the copy equal to the server's keys bit for
bit, and a query then asks only for slots, sims and KL.

Exactness is checked, never assumed: each query reply's `version` must be the mirror's (anything
else means another client wrote, and the mirror is dropped for good), and every `VERIFY_EVERY`
updates a sample of slots is compared with `get` (a server holding keys at another precision fails
that and is dropped too). A dropped mirror costs nothing but speed: the queries carry the keys again.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from memory_server import rules

log = logging.getLogger(__name__)

SYNC_ROWS = 8192  # slots per `get` when the mirror is first filled (~27 MB replies at dk 512, dv 313)
VERIFY_EVERY = 256  # updates between spot checks against the server
VERIFY_ROWS = 64


class KeyMirror:
    """Keys [m, dk] float32 on the host (the truth) and, for a CUDA device, a device copy kept in step."""

    def __init__(self, client, capacity: int, device: torch.device, seed: int = 0) -> None:
        self.client = client
        self.device = device
        self.rng = np.random.default_rng(seed)
        first = client.get(np.arange(min(SYNC_ROWS, capacity), dtype=np.int64))
        version = first["version"]
        parts = [first["keys"]]
        for start in range(SYNC_ROWS, capacity, SYNC_ROWS):
            part = client.get(np.arange(start, min(start + SYNC_ROWS, capacity), dtype=np.int64))
            if part["version"] != version:
                raise MirrorStale(f"the memory changed while its keys were read (version {version} -> "
                                  f"{part['version']})")
            parts.append(part["keys"])
        self.keys = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)
        self.version = int(version)
        self.updates = 0
        # On the CPU the tensor shares the array's memory; on a GPU only written rows cross the bus.
        self.device_keys = torch.from_numpy(self.keys) if device.type == "cpu" else torch.from_numpy(self.keys).to(device)

    def gather(self, slots: np.ndarray) -> torch.Tensor:
        """Keys at `slots` [B, k] as a [B, k, dk] tensor on the device (what a `keys` field would hold)."""
        index = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        return self.device_keys.index_select(0, index.reshape(-1)).view(*slots.shape, self.keys.shape[1])

    def apply_update(self, q: np.ndarray, reply: dict) -> None:
        """Replay one `update` of queries `q` whose reply is `reply` (PROTOCOL.md's update rule, steps 4-5).

        MirrorStale when the reply's version is not the next one (another client wrote in between)."""
        if int(reply["version"]) != self.version + 1:
            raise MirrorStale(f"update reply at version {reply['version']}, the mirror at {self.version}")
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
        if self.device.type != "cpu":
            rows = np.unique(np.concatenate(written))
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


class MirrorStale(RuntimeError):
    """The mirror no longer equals the server's keys; the caller drops it and asks for keys again."""

"""Recovery fuzzing (issue 10): random truncations, bit flips, deletions and zeroed ranges in a data dir.

A data dir is built once with a known history (a snapshot, a sealed segment after a failed snapshot, a
last segment; creates, drops, updates and puts on three memories), with the state after every logged
effect fingerprinted. Each case damages a copy and runs recovery (the server's own code, in-process).
The outcome must be a refusal (RecoveryError: exit 4 in the server), or exactly the state after all
records, or, only when the damage makes the last segment end like a torn write (PROTOCOL.md: the file
ends inside a record whose prefix is intact, or is zero from a record's start), exactly the state
before that record. The oracle reads the original files with its own parser, not the server's.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
from memserver_helpers import UpdateStream

from memory_server.durability import Durability, DurabilityConfig, RecoveryError
from memory_server.local import InProcessMemory
from memory_server.store import MemoryStore

KINDS = ("flip", "truncate", "delete_range", "zero_range", "zero_to_end", "delete_file", "insert")
SEGMENT_HEADER = 20
PREFIX = 12


class WrongData(AssertionError):
    """Recovery served a state that the damage does not allow."""


class RecoveryCrash(AssertionError):
    """Recovery failed with something other than a clear refusal."""


@dataclass(frozen=True)
class Damage:
    """One damage: a file (index into the sorted file list) and where, as fractions of its size."""

    file: int
    kind: str
    at: float
    length: float = 0.0
    bit: int = 0


def fingerprint(store: MemoryStore) -> str:
    """A hash of every memory's name, version, four arrays and idempotency window."""
    h = hashlib.sha256()
    for name in sorted(store.memories):
        mem = store.memories[name]
        h.update(f"{name}:{mem.version}:".encode())
        for a in (mem.keys, mem.values, mem.ages, mem.item_ids):
            h.update(a.tobytes())
        h.update(msgpack.packb([[k, e.version] for k, e in mem.window.items()]))
    return h.hexdigest()


def parse_segment(data: bytes) -> list[tuple[int, int, int | None]]:
    """(start, end, sequence number or None for a seal) of each record, read independently of wal.py."""
    out, pos = [], SEGMENT_HEADER
    while pos < len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        end = pos + PREFIX + length
        (hlen,) = struct.unpack_from("<I", data, pos + PREFIX)
        header = msgpack.unpackb(data[pos + PREFIX + 4: pos + PREFIX + 4 + hlen], raw=False)
        out.append((pos, end, header.get("n")))
        pos = end
    return out


def build_history(path: Path) -> list[str]:
    """A data dir with a known history; returns the fingerprint after each logged effect (index = count)."""
    mem = InProcessMemory(None, data_dir=path, durability="always", backend="faiss")
    store, dur = mem.store, mem.engine.durability
    fps = [fingerprint(store)]
    stream = UpdateStream(4, 3, seed=5, pool=6, batch=3)

    def step(call: Any) -> None:
        call()
        fps.append(fingerprint(store))

    rng = np.random.default_rng(9)
    step(lambda: mem.create(12, 4, 3, seed=1))
    step(lambda: mem.create(6, 3, 2, seed=2, memory="b"))
    for _ in range(3):
        step(lambda: mem.update(**stream.next()))
    step(lambda: mem.put([1, 4], rng.standard_normal((2, 3)), rng.random((2, 2)) + 0.1, memory="b"))
    mem.snapshot()
    for _ in range(2):
        step(lambda: mem.update(**stream.next()))
    step(lambda: mem.put([0], rng.standard_normal((1, 3)), rng.random((1, 2)) + 0.1, memory="b", request_id=77))
    step(lambda: mem.drop(memory="b"))
    dur.want_snapshot = False  # the drop's snapshot would cover everything; keep a log to replay
    step(lambda: mem.create(5, 2, 2, seed=3, memory="c"))
    dur.cfg.fault_snapshot_failures = 1  # rotates (sealing the segment), then fails: two segments remain
    try:
        mem.snapshot()
    except Exception:  # noqa: BLE001 - the injected failure is the point
        pass
    dur.next_attempt = float("inf")
    for _ in range(3):
        step(lambda: mem.update(**stream.next()))
    step(lambda: mem.put([2], rng.standard_normal((1, 2)), rng.random((1, 2)) + 0.1, memory="c"))
    dur.close(store, final_snapshot=False)
    return fps


class RecoveryFuzz:
    """The reference data dir, its fingerprints, and the oracle."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.base = workdir / "base"
        self.fps = build_history(self.base)
        self.total = len(self.fps) - 1  # effects logged
        self.files = sorted(p.relative_to(self.base) for p in self.base.rglob("*") if p.is_file())
        segs = sorted(p for p in self.files if p.name.startswith("wal-"))
        assert len(segs) == 2 and any(p.parts[0].startswith("snap-") for p in self.files), self.files
        self.last_segment = segs[-1]
        self.last_original = (self.base / self.last_segment).read_bytes()
        self.last_records = parse_segment(self.last_original)
        first = [n for _, _, n in self.last_records if n is not None]
        self.last_first_lsn = first[0] if first else self.total
        self.counts = {"cases": 0, "refused": 0, "full": 0, "torn": 0, "crashes": 0, "wrong": 0, "lost": 0}

    # ---- damage ---------------------------------------------------------------------------------

    def apply(self, damage: Damage, target: Path) -> Path:
        rel = self.files[damage.file % len(self.files)]
        path = target / rel
        data = bytearray(path.read_bytes())
        n = len(data)
        a = min(n, int(damage.at * n))
        b = min(n, a + max(1, int(damage.length * max(1, n - a))))
        if damage.kind == "delete_file":
            path.unlink()
            return rel
        if damage.kind == "flip" and n:
            data[min(a, n - 1)] ^= 1 << damage.bit
        elif damage.kind == "truncate":
            del data[a:]
        elif damage.kind == "delete_range":
            del data[a:b]
        elif damage.kind == "zero_range":
            data[a:b] = bytes(b - a)
        elif damage.kind == "zero_to_end":
            data[a:] = bytes(n - a)
        elif damage.kind == "insert":
            data[a:a] = bytes((damage.bit * 37 + i * 11) % 256 for i in range(1 + int(damage.length * 40)))
        path.write_bytes(bytes(data))
        return rel

    def allowed(self, rel: Path, target: Path) -> set[int]:
        """Effect counts a recovery may serve after this damage (refusing is always allowed)."""
        if rel.name == "LOCK":
            return {self.total}
        if rel != self.last_segment:
            return {self.total}  # anything else must be refused, unless the damage changed nothing
        path = target / rel
        d = path.read_bytes() if path.exists() else None
        o = self.last_original
        if d is None:
            return set()  # the sealed segment before it names it: a deleted last segment must refuse
        if d == o:
            return {self.total}
        diff = next((i for i in range(min(len(d), len(o))) if d[i] != o[i]), min(len(d), len(o)))
        if diff < SEGMENT_HEADER:
            head = d[:SEGMENT_HEADER]
            torn_creation = (len(d) < SEGMENT_HEADER or head.count(0) == len(head)) and d[len(head):].count(0) == \
                len(d) - len(head)
            return {self.last_first_lsn} if torn_creation else set()
        for start, end, lsn in self.last_records:
            if start <= diff < end:
                rest = d[start:]
                torn = rest.count(0) == len(rest) or len(rest) < PREFIX or (
                    rest[:PREFIX] == o[start:start + PREFIX] and len(d) < end)
                return {lsn} if torn else set()
        return {self.total}  # bytes after the last record: a fragment or zeros to cut, or refused

    # ---- one case -------------------------------------------------------------------------------

    def check(self, damage: Damage) -> str:
        """Damage a copy, recover it, judge the outcome; returns 'refused', 'full' or 'torn'."""
        self.counts["cases"] += 1
        target = self.workdir / "case"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(self.base, target)
        rel = self.apply(damage, target)
        allowed = self.allowed(rel, target)
        store = MemoryStore("faiss-cpu")
        dur = Durability(DurabilityConfig(data_dir=target, lock_timeout_s=1.0))
        try:
            dur.open(store)
        except RecoveryError:
            self.counts["refused"] += 1
            return "refused"
        except Exception as exc:
            self.counts["crashes"] += 1
            raise RecoveryCrash(f"{damage} on {rel}: {type(exc).__name__}: {exc}") from exc
        finally:
            dur.close(store, final_snapshot=False)
        got = fingerprint(store)
        served = [j for j, fp in enumerate(self.fps) if fp == got]
        if not served or served[-1] not in allowed:
            self.counts["wrong"] += 1
            j = served[-1] if served else -1
            if 0 <= j < self.total:
                self.counts["lost"] += self.total - j
            raise WrongData(f"{damage} on {rel}: served the state after {j} of {self.total} effects; allowed "
                            f"{sorted(allowed) or 'only a refusal'}")
        outcome = "full" if served[-1] == self.total else "torn"
        self.counts[outcome] += 1
        return outcome

    def run_for(self, seconds: float, seed: int = 0) -> dict[str, int]:
        """Random damages until `seconds` have passed; failures are counted, not raised."""
        rng = np.random.default_rng(seed or time.time_ns() % 2**32)
        logging.getLogger("memory_server").setLevel(logging.CRITICAL)  # thousands of expected refusals
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            damage = Damage(int(rng.integers(0, len(self.files))), str(rng.choice(KINDS)), float(rng.random()),
                            float(rng.random() ** 3), int(rng.integers(0, 8)))
            try:
                self.check(damage)
            except (WrongData, RecoveryCrash) as exc:
                print(f"RECOVERY {type(exc).__name__}: {exc}", flush=True)
        return dict(self.counts)

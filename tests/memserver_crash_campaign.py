"""Crash-consistency campaign (issue 10, `make crash-test`): kill -9 a real server at random points of a
mixed stream of updates, puts, creates, drops and snapshots, restart it, and compare every memory bit for
bit with an in-process replay of the acknowledged requests.

Per durability mode (`always`, `batch`) one data dir lives through all rounds. A round streams requests
from one client (explicit request ids and seeds, so the replay is exact), kills the server after a random
number of acknowledgements plus a random delay (mid-request, mid-fsync, mid-snapshot: snapshots run
every few kB of log and on request), restarts it on the same data dir and compares. `always` must hold
exactly the acknowledged requests, plus possibly the one in flight; `batch` may hold a prefix of them
(kill -9 keeps the page cache, so none is expected to be missing). After the comparison the last
acknowledged update is resent with its id: the reply must be the first one (the idempotency window
survived). Prints the counts; exit 1 on any lost update, silent corruption or failed restart.

    python tests/memserver_crash_campaign.py --kills 240          # 120 per mode
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from memory_server.client import MemoryClient, MemoryServerError, MemoryUnavailable  # noqa: E402
from memory_server.launcher import ServerStartError, start_server  # noqa: E402
from memory_server.local import InProcessMemory  # noqa: E402

SHAPES = {"m0": (64, 16, 8), "m1": (32, 8, 4), "m2": (16, 4, 3)}


@dataclass
class Request:
    """One request of the stream: a MemoryClient method name and its arguments."""

    method: str
    kwargs: dict[str, Any]


def make_stream(rng: np.random.Generator, tag: str, n: int) -> list[Request]:
    """A mixed stream: mostly updates and puts, some creates, drops and snapshots."""
    out = []
    for i in range(n):
        name = str(rng.choice(["m0", "m0", "m0", "m1", "m2"]))
        m, dk, dv = SHAPES[name]
        r = rng.random()
        if r < 0.55:
            b = int(rng.integers(1, 7))
            out.append(Request("update", {
                "q": rng.standard_normal((b, dk)).astype(np.float32), "v": (rng.random((b, dv)) + 0.01).astype(np.float32),
                "threshold": float(rng.choice([0.0, 0.3, 2.0])), "age_noise": float(rng.choice([0.0, 3.0])),
                "seed": int(rng.integers(0, 2**31)), "item_ids": rng.integers(0, 1000, b),
                "memory": name, "request_id": f"{tag}-{i}"}))
        elif r < 0.75:
            n_rows = int(rng.integers(1, 5))
            out.append(Request("put", {
                "slots": rng.choice(m, n_rows, replace=False), "keys": rng.standard_normal((n_rows, dk)),
                "values": rng.random((n_rows, dv)) + 0.01, "ages": rng.random(n_rows) * 5,
                "item_ids": rng.integers(0, 1000, n_rows), "memory": name, "request_id": f"{tag}-{i}"}))
        elif r < 0.85:
            out.append(Request("create", {"capacity": m, "key_dim": dk, "value_dim": dv, "seed": int(rng.integers(0, 99)),
                                          "memory": name}))
        elif r < 0.93 and name != "m0":
            out.append(Request("drop", {"memory": name}))
        else:
            out.append(Request("snapshot", {}))
    return out


def call(api: Any, req: Request) -> tuple[str, Any]:
    """('ok', reply) or ('error', code); MemoryUnavailable propagates."""
    try:
        return "ok", getattr(api, req.method)(**req.kwargs)
    except MemoryServerError as exc:
        return "error", exc.code


def state_of(api: Any) -> tuple[str, dict[str, int]]:
    """A hash of every memory (names, versions, four arrays) and the versions."""
    h = hashlib.sha256()
    versions = {}
    for name in sorted(api.info()["memories"]):
        ex = api.export(memory=name)
        versions[name] = int(ex["version"])
        h.update(f"{name}:{ex['version']}".encode())
        for k in ("keys", "values", "ages", "item_ids"):
            h.update(np.ascontiguousarray(ex[k]).tobytes())
    return h.hexdigest(), versions


@dataclass
class Tally:
    """Counts of one durability mode."""

    kills: int = 0
    acked: int = 0
    in_flight_applied: int = 0
    lost: int = 0
    corruptions: int = 0
    failed_restarts: int = 0
    idempotency_lost: int = 0
    mid_snapshot: int = 0  # kills that found a snapshot being written (its tmp directory present)
    notes: list[str] = field(default_factory=list)


class Streamer(threading.Thread):
    """Sends the stream until the server stops answering; records what was acknowledged."""

    def __init__(self, endpoint: str, stream: list[Request]) -> None:
        super().__init__(daemon=True)
        # A short deadline: after the kill the client gives up quickly (a timeout before the kill is
        # harmless: that request is then the one in flight).
        self.client = MemoryClient(endpoint, timeout_ms=700, retries=0)
        self.stream = stream
        self.results: list[tuple[str, Any]] = []
        self.n_acked = 0

    def run(self) -> None:
        try:
            for req in self.stream:
                self.results.append(call(self.client, req))
                self.n_acked += 1
        except MemoryUnavailable:
            pass
        finally:
            self.client.close()


def campaign(mode: str, kills: int, seed: int, workdir: Path, log: Any = print) -> Tally:
    """Run `kills` rounds in one durability mode; returns the counts."""
    rng = np.random.default_rng(seed)
    data = workdir / f"data-{mode}"
    shutil.rmtree(data, ignore_errors=True)
    ref = InProcessMemory(durability="none", backend="faiss")
    tally = Tally()
    base = ["--backend", "faiss", "--snapshot-wal-bytes", "6000", "--lock-timeout-s", "30"]
    srv = start_server(data, durability=mode, extra_args=base, log_path=workdir / f"server-{mode}.log")
    last_update: tuple[Request, dict] | None = None
    for round_no in range(kills):
        stream = make_stream(rng, f"{mode}{round_no}", 400)
        s = Streamer(srv.endpoint, stream)
        s.start()
        target = int(rng.integers(1, 60))
        deadline = time.monotonic() + 120
        while s.n_acked < target and s.is_alive() and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(float(rng.random()) * 0.02)  # lands mid-request, mid-fsync or mid-snapshot
        srv.kill()
        tally.kills += 1
        tally.mid_snapshot += bool(list(data.glob("snap-*.tmp")))
        s.join(30)
        acked = s.results[:]
        tally.acked += len(acked)
        extra = ["--snapshot-mode", str(rng.choice(["fork", "sync"]))]
        try:
            srv = start_server(data, durability=mode, extra_args=base + extra,
                               log_path=workdir / f"server-{mode}.log")
        except ServerStartError as exc:
            tally.failed_restarts += 1
            tally.notes.append(f"round {round_no}: restart failed: {str(exc)[-300:]}")
            log(tally.notes[-1])
            break
        fps = [state_of(ref)[0]]
        for req, (kind, value) in zip(stream, acked, strict=False):
            got = call(ref, req)
            if got[0] != kind or (kind == "error" and got[1] != value):
                tally.corruptions += 1
                tally.notes.append(f"round {round_no}: {req.method} answered {kind} {value!r:.60}, replay {got!r:.60}")
            if req.method == "update" and kind == "ok" and req.kwargs["memory"] == "m0":
                last_update = (req, value)  # m0 is never dropped, so its window must keep this id
            fps.append(state_of(ref)[0])
        with MemoryClient(srv.endpoint, timeout_ms=30_000) as c:
            server_fp, _ = state_of(c)
            if server_fp != fps[-1] and len(acked) < len(stream):
                req = stream[len(acked)]
                kind, value = call(ref, req)  # the request in flight at the kill was logged
                if state_of(ref)[0] == server_fp:
                    tally.in_flight_applied += 1
                    if req.method == "update" and kind == "ok" and req.kwargs["memory"] == "m0":
                        last_update = (req, value)
                else:
                    prefix = [k for k, fp in enumerate(fps) if fp == server_fp]
                    if prefix and mode == "batch":
                        tally.lost += len(acked) - prefix[-1]
                    elif prefix:
                        tally.lost += len(acked) - prefix[-1]
                        tally.corruptions += 1
                    else:
                        tally.corruptions += 1
                    tally.notes.append(f"round {round_no}: the server holds "
                                       f"{'the state after ' + str(prefix[-1]) if prefix else 'a state after no prefix'}"
                                       f" of {len(acked)} acknowledged requests")
                    log(tally.notes[-1])
                    break
            if last_update is not None:
                req, first = last_update
                again = getattr(c, req.method)(**req.kwargs)
                if again.get("version") != first.get("version") or any(
                        not np.array_equal(again[k], first[k]) for k in ("hit", "slots") if k in first):
                    tally.idempotency_lost += 1
                    tally.notes.append(f"round {round_no}: resending {req.kwargs['request_id']} applied it again")
        if (round_no + 1) % 20 == 0:
            log(f"  {mode}: {round_no + 1} kills, {tally.acked} acknowledged requests checked, lost {tally.lost}, "
                f"corruptions {tally.corruptions}")
    srv.kill()
    return tally


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=240, help="kill -9 in total, split over the modes")
    p.add_argument("--modes", default="always,batch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    results = {}
    with tempfile.TemporaryDirectory(prefix="memcrash-") as tmp:
        for i, mode in enumerate(modes):
            results[mode] = campaign(mode, args.kills // len(modes), args.seed + i, Path(tmp))
    print("\nmake crash-test summary")
    bad = 0
    for mode, t in results.items():
        print(f"  {mode:6s}: {t.kills} kill -9 ({t.mid_snapshot} while a snapshot was being written), {t.acked} "
              f"acknowledged requests compared bit for bit, in-flight request applied {t.in_flight_applied} times; "
              f"acknowledged updates lost {t.lost}, "
              f"silent corruptions {t.corruptions}, failed restarts {t.failed_restarts}, idempotency lost "
              f"{t.idempotency_lost}")
        for note in t.notes[:10]:
            print(f"    {note}")
        bad += t.lost + t.corruptions + t.failed_restarts + t.idempotency_lost
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

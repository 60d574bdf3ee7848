"""How this asset was made: a data dir written by the format-1 memory server (release ad23129).

Not run by the tests (it needs the old release). To remake it:

    git worktree add /tmp/old ad23129
    cd /tmp/old && PYTHONPATH=/tmp/old python <repo>/tests/assets/memserver_format1/make_asset.py \
        <repo>/tests/assets/memserver_format1
    git worktree remove /tmp/old

It starts the OLD server (durability always, fork snapshots held open 5 s before their rename), creates
memories, runs updates and puts, drops one, takes a snapshot (snap-00000003), runs more updates, puts and
a create; then creates and drops a memory (the drop starts snapshot 4) and, while that snapshot is still
open, runs more updates, exports every memory (expected.npz, expected.json) and kills the server with
SIGKILL. `data/` is left as the crashed format-1 server left it: snap-00000003, wal-00000003.log (ending
in the drop), wal-00000004.log and the incomplete snap-00000004.tmp. `data-clean/` is a copy of it that
the OLD server then recovered and stopped with SIGTERM (its final snapshot snap-00000005 and an empty
wal-00000005.log): the same state, left the way most data dirs are found at an upgrade. `data-nosnap/`
is a second server killed before it ever took a snapshot (one memory, `wal-00000001.log` only);
its expected state is under `nosnap` in expected.json and `nosnap/...` in expected.npz. `resend` lists
acknowledged requests (with their replies) that a client may retry: the upgraded server must answer
them from its idempotency window.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from memory_server.client import MemoryClient
from memory_server.launcher import start_server

SHAPES = {"alpha": (48, 8, 5, 11), "beta": (32, 6, 4, 12), "gamma": (16, 4, 3, 13)}
LONG_ID = "L" * 300  # a request id the format-2 server no longer accepts (over 256 bytes)


class Stream:
    """Update payloads around a small pool of 'images', so that some rows hit and some miss."""

    def __init__(self, key_dim: int, value_dim: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.pool_q = self.rng.standard_normal((10, key_dim)).astype(np.float32)
        raw = self.rng.random((10, value_dim)) * (self.rng.random((10, value_dim)) < 0.6)
        raw[:, 0] += 0.05
        self.pool_v = raw.astype(np.float32)
        self.n = 0

    def update(self) -> dict:
        pick = self.rng.integers(0, 10, 5)
        q = self.pool_q[pick] + 0.05 * self.rng.standard_normal((5, self.pool_q.shape[1])).astype(np.float32)
        self.n += 1
        return {"q": q.astype(np.float32), "v": self.pool_v[pick], "threshold": 0.3, "age_noise": 2.0,
                "seed": 500 + self.n, "item_ids": pick.astype(np.int64) + 100 * self.n}

    def put(self, capacity: int) -> dict:
        slots = self.rng.choice(capacity, 3, replace=False).astype(np.int64)
        return {"slots": slots, "keys": self.rng.standard_normal((3, self.pool_q.shape[1])).astype(np.float32),
                "values": (self.rng.random((3, self.pool_v.shape[1])) + 0.01).astype(np.float32),
                "ages": self.rng.random(3).astype(np.float32) * 10,
                "item_ids": self.rng.integers(0, 10**6, 3).astype(np.int64)}


def main(out: Path) -> None:
    data = out / "data"
    shutil.rmtree(data, ignore_errors=True)
    srv = start_server(data, durability="always", extra_args=["--snapshot-mode", "fork", "--fault-snapshot-pause-s", "5"])
    resend, arrays = [], {}

    def remember(kind: str, memory: str, req_id: str, payload: dict, reply: dict) -> None:
        tag = f"resend{len(resend)}"
        for k, a in payload.items():
            if isinstance(a, np.ndarray):
                arrays[f"{tag}/{k}"] = a
        scalars = {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)}
        resend.append({"op": kind, "memory": memory, "id": req_id, "tag": tag, "args": scalars,
                       "arrays": sorted(k for k, v in payload.items() if isinstance(v, np.ndarray)),
                       "reply": {"version": reply["version"],
                                 **({"hit": reply["hit"].tolist(), "slots": reply["slots"].tolist()}
                                    if kind == "update" else {})}})

    with MemoryClient(srv.endpoint, timeout_ms=30_000) as c:
        for name, (m, dk, dv, seed) in SHAPES.items():
            c.create(m, dk, dv, seed=seed, memory=name)
        streams = {n: Stream(SHAPES[n][1], SHAPES[n][2], seed=SHAPES[n][3]) for n in SHAPES}
        n_up = dict.fromkeys(SHAPES, 0)

        def update(name: str, keep: bool = False) -> None:
            n_up[name] += 1
            req_id, payload = f"{name}-u{n_up[name]}", streams[name].update()
            reply = c.update(**payload, memory=name, request_id=req_id)
            if keep:
                remember("update", name, req_id, payload, reply)

        def put(name: str, req_id: str, keep: bool = False) -> None:
            payload = streams[name].put(SHAPES[name][0])
            reply = c.put(**payload, memory=name, request_id=req_id)
            if keep:
                remember("put", name, req_id, payload, reply)

        for i in range(8):
            update("alpha", keep=i == 5)
            update("beta")
        put("beta", "beta-p1", keep=True)
        update("gamma")
        c.drop(memory="gamma")  # starts snapshot 2 (wal-00000002.log begins)
        update("alpha")
        c.snapshot(memory="alpha")  # waits for snapshot 2, then takes snapshot 3: durable on return
        for i in range(6):
            update("alpha", keep=i == 4)
            update("beta")
        put("alpha", LONG_ID)
        put("beta", "beta-p2", keep=True)
        c.create(24, 4, 3, seed=14, memory="delta")
        SHAPES["delta"] = (24, 4, 3, 14)
        streams["delta"], n_up["delta"] = Stream(4, 3, seed=14), 0
        for _ in range(3):
            update("delta")
        c.create(8, 2, 2, seed=15, memory="eps")
        c.drop(memory="eps")  # starts snapshot 4, held open 5 s: the kill below lands inside it
        update("beta")
        update("delta")
        update("alpha", keep=True)  # the last acknowledged request before the crash
        expected, versions = {}, {}
        for name in ("alpha", "beta", "delta"):
            exp = c.export(memory=name)
            versions[name] = exp["version"]
            for k in ("keys", "values", "ages", "item_ids"):
                expected[f"{name}/{k}"] = exp[k]
            shape = SHAPES[name]
            versions[name] = {"version": exp["version"], "capacity": shape[0], "key_dim": shape[1],
                              "value_dim": shape[2]}
    assert (data / "snap-00000004.tmp").is_dir(), "the kill must land inside snapshot 4"
    srv.kill()  # kill -9: no final snapshot; the WAL holds everything after snap-00000003
    clean = out / "data-clean"
    shutil.rmtree(clean, ignore_errors=True)
    shutil.copytree(data, clean)
    srv = start_server(clean, durability="always", extra_args=["--snapshot-mode", "sync"])
    assert srv.stop() == 0
    nosnap = out / "data-nosnap"
    shutil.rmtree(nosnap, ignore_errors=True)
    srv = start_server(nosnap, durability="always")
    with MemoryClient(srv.endpoint, timeout_ms=30_000) as c:
        c.create(20, 3, 3, seed=16, memory="solo")
        stream = Stream(3, 3, seed=16)
        for i in range(4):
            payload = stream.update()
            reply = c.update(**payload, memory="solo", request_id=i)  # int ids
            if i == 2:
                for k, a in payload.items():
                    if isinstance(a, np.ndarray):
                        expected[f"nosnap/resend/{k}"] = a
                resend_nosnap = {"id": i, "args": {k: v for k, v in payload.items() if not isinstance(v, np.ndarray)},
                                 "arrays": sorted(k for k, v in payload.items() if isinstance(v, np.ndarray)),
                                 "reply": {"version": reply["version"], "hit": reply["hit"].tolist(),
                                           "slots": reply["slots"].tolist()}}
        c.put(**stream.put(20), memory="solo")
        exp = c.export(memory="solo")
        for k in ("keys", "values", "ages", "item_ids"):
            expected[f"nosnap/solo/{k}"] = exp[k]
    srv.kill()
    np.savez(out / "expected.npz", **expected, **arrays)
    (out / "expected.json").write_text(json.dumps({
        "memories": versions, "resend": resend, "long_id": LONG_ID,
        "nosnap": {"memories": {"solo": {"version": exp["version"], "capacity": 20, "key_dim": 3, "value_dim": 3}},
                   "resend": resend_nosnap}}, indent=1) + "\n")
    for d in (data, clean, nosnap):
        print(sorted(p.relative_to(out).as_posix() for p in d.iterdir()))


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())

"""Memories of millions (issue 13): exact vs `--index approximate` vs `--value-dtype float16`, one run.

One data dir holding m clustered keys (dk 512, dv 313) is built in-process and snapshotted; then one
server at a time (never two: a 1e6 memory is 3.3 GB) serves it with each set of flags and is measured:
first start, a 256-row k = 1 query, a 256-row update, snapshot, restart to the first answered query,
resident bytes per slot (its RSS minus an empty server's, over m), recall@1 against exact search
computed in this process before the server starts, and the retrieval KL of float16 values against
float32 on the same queries. Ratios are against the exact server of the same run; each set of flags starts from the same
state (a hard-linked copy of the data dir).

Keys: 4,096 random unit centers, each key = normalise(center + 0.6 * g / sqrt(dk)) (cosine to its center
~0.86, like features of one kind of picture). Two query sets: `near` = a stored key plus 0.3 relative
noise (the trainer meeting a training image again, augmented), `fresh` = a new draw of the same
distribution (an unseen image of a known kind: many slots nearly tie, the hard case for an IVF index).

    python benchmarks/memory_scale.py [--quick] # m = 50,000 (about a minute; make bench)
    python benchmarks/memory_scale.py --full    # m = 1,000,000 (about 10 minutes, ~4 GB RAM, ~8 GB disk)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_server import rules  # noqa: E402
from memory_server.client import MemoryClient  # noqa: E402
from memory_server.launcher import start_server  # noqa: E402
from memory_server.local import InProcessMemory  # noqa: E402
from memory_server.store import MemoryStore  # noqa: E402

DK, DV, NQ, CENTERS = 512, 313, 256, 4096
MODES = {  # name -> server flags
    "exact": ["--backend", "faiss"],
    "approximate": ["--backend", "faiss", "--index", "approximate"],
    "float16": ["--backend", "faiss", "--value-dtype", "float16"],
}


def unit(x: np.ndarray) -> np.ndarray:
    return rules.normalize_rows(np.ascontiguousarray(x, np.float32))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def build(data: Path, m: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Write a snapshotted data dir of m clustered keys; returns the query sets with their exact top-1.

    The arrays are filled in place and then snapshotted, bypassing the log: putting 1e6 rows through
    the server would write 3.3 GB of WAL for nothing the benchmark measures.
    """
    import faiss  # noqa: PLC0415

    centers = unit(rng.standard_normal((CENTERS, DK), dtype=np.float32))
    with InProcessMemory(MemoryStore("faiss-cpu"), capacity=m, key_dim=DK, value_dim=DV, seed=1,
                         data_dir=data, durability="always") as mem:
        store_mem = mem.store.memories["default"]
        step = 65_536
        for i in range(0, m, step):
            j = min(i + step, m)
            noise = rng.standard_normal((j - i, DK), dtype=np.float32) * np.float32(0.6 / np.sqrt(DK))
            store_mem.keys[i:j] = unit(centers[rng.integers(0, CENTERS, j - i)] + noise)
            v = rng.random((j - i, DV), dtype=np.float32) ** 8 + np.float32(1e-6)  # peaked distributions
            store_mem.values[i:j] = v / v.sum(1, keepdims=True)
            store_mem.negent[i:j] = rules.negentropy(store_mem.values[i:j])
        store_mem.written[:] = True
        store_mem.filled = m
        keys = store_mem.keys
        picked = rng.integers(0, m, NQ)
        near = unit(keys[picked] + rng.standard_normal((NQ, DK), dtype=np.float32) * np.float32(0.3 / np.sqrt(DK)))
        fresh = unit(centers[rng.integers(0, CENTERS, NQ)]
                     + rng.standard_normal((NQ, DK), dtype=np.float32) * np.float32(0.6 / np.sqrt(DK)))
        upd = [unit(keys[rng.integers(0, m, NQ)] + rng.standard_normal((NQ, DK), dtype=np.float32)
                    * np.float32(0.3 / np.sqrt(DK))) for _ in range(3)]
        truth = {n: faiss.knn(q, keys, 1, metric=faiss.METRIC_INNER_PRODUCT)[1][:, 0] for n, q in
                 (("near", near), ("fresh", fresh))}
        mem.snapshot()
    gc.collect()
    tv = rng.random((NQ, DV), dtype=np.float32) ** 8 + np.float32(1e-6)
    return {"near": near, "fresh": fresh, "truth_near": truth["near"], "truth_fresh": truth["fresh"],
            "targets": tv / tv.sum(1, keepdims=True), "upd": upd}


def timed(fn, reps: int) -> tuple[float, object]:
    """Median seconds of `reps` calls, and the last result."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def fork_data_dir(src: Path, dst: Path) -> Path:
    """A copy of the pristine data dir for one mode: snapshot files hard-linked (never written in place),
    everything else (the log, the lock) copied, so each mode starts from the same state."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dst / p.name, copy_function=os.link)
        else:
            shutil.copy2(p, dst / p.name)
    return dst


def measure(mode: str, data: Path, m: int, sets: dict, reps: int, base_rss: int) -> dict:
    flags = MODES[mode]
    t0 = time.perf_counter()
    srv = start_server(data, extra_args=flags, timeout_s=1800)
    first_start = time.perf_counter() - t0
    out: dict = {"mode": mode, "m": m, "first_start_s": first_start}
    try:
        with MemoryClient(srv.endpoint, timeout_ms=1_800_000, retries=0) as c:
            out["recall_near"] = float(np.mean(c.query(sets["near"], 1)["slots"][:, 0] == sets["truth_near"]))
            out["recall_fresh"] = float(np.mean(c.query(sets["fresh"], 1)["slots"][:, 0] == sets["truth_fresh"]))
            kl = c.query(sets["near"], 1, targets=sets["targets"])
            out["_kl"], out["_kl_slots"] = kl["kl"][:, 0], kl["slots"][:, 0]
            out["query_s"], _ = timed(lambda: c.query(sets["near"], 1), reps)
            upd = iter(sets["upd"] * reps)
            out["update_s"], _ = timed(lambda: c.update(next(upd), sets["targets"], threshold=0.5), min(reps, 3))
            out["rss_bytes_per_slot"] = (rss_bytes(srv.pid) - base_rss) / m
            out["snapshot_s"], _ = timed(c.snapshot, 1)
        srv.kill()  # nothing changed since that snapshot: the restart replays no log
        t0 = time.perf_counter()
        srv = start_server(data, extra_args=flags, timeout_s=1800)
        with MemoryClient(srv.endpoint, timeout_ms=1_800_000, retries=0) as c:
            c.query(sets["near"][:1], 1)
        out["restart_s"] = time.perf_counter() - t0
        found = re.search(r"IVF index trained: .* in ([0-9.]+) s", srv.log_tail(50_000))
        out["trained_on_restart"] = bool(found)
    finally:
        srv.kill()
    return out


def empty_rss(flags: list[str]) -> int:
    srv = start_server(None, durability="none", capacity=1, key_dim=DK, value_dim=DV, extra_args=flags)
    try:
        with MemoryClient(srv.endpoint) as c:
            c.query(np.ones((1, DK), np.float32), 1)
        return rss_bytes(srv.pid)
    finally:
        srv.kill()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="m = 50,000")
    size.add_argument("--full", action="store_true", help="m = 1,000,000")
    p.add_argument("--m", type=int, default=None, help="capacity (overrides --quick/--full)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    p.add_argument("--modes", default="exact,approximate,float16", help="which flag sets (exact is the baseline)")
    args = p.parse_args(argv)
    m = args.m or (1_000_000 if args.full else 50_000)
    reps = 3 if m >= 500_000 else 5
    tmp = Path(tempfile.mkdtemp(prefix="memory-scale-"))
    try:
        t0 = time.perf_counter()
        sets = build(tmp / "data", m, np.random.default_rng(0))
        print(f"built m = {m:,} (dk {DK}, dv {DV}) in {time.perf_counter() - t0:.0f} s", flush=True)
        base_rss = empty_rss(MODES["exact"])
        rows = {}
        for mode in ["exact", *[x for x in args.modes.split(",") if x in MODES and x != "exact"]]:
            data = fork_data_dir(tmp / "data", tmp / mode)
            rows[mode] = measure(mode, data, m, sets, reps, base_rss)
            shutil.rmtree(data)
            print(f"  {mode}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in rows[mode].items() if not k.startswith("_")), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ex = rows["exact"]
    other = rows.get("float16", ex)
    same = other["_kl_slots"] == ex["_kl_slots"]
    dkl = np.abs(other["_kl"][same].astype(np.float64) - ex["_kl"][same])
    print(f"\nm = {m:,}, dk {DK}, dv {DV}, 256-row requests, k = 1, durability always, this machine "
          f"({os.cpu_count()} cores); ratios against exact in this run\n")
    print("| flags | query 256 x k=1 | update 256 | recall@1 near / fresh | snapshot | restart to 1st query "
          "| first start | RSS B/slot |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['query_s']:.3f} s ({ex['query_s'] / r['query_s']:.1f}x) "
              f"| {r['update_s']:.3f} s ({ex['update_s'] / r['update_s']:.1f}x) "
              f"| {r['recall_near']:.3f} / {r['recall_fresh']:.3f} | {r['snapshot_s']:.1f} s | {r['restart_s']:.1f} s "
              f"| {r['first_start_s']:.1f} s | {r['rss_bytes_per_slot']:,.0f} |")
    print(f"\nfloat16 values: retrieval KL |float16 - float32| over {int(same.sum())} queries with the same slot: "
          f"mean {dkl.mean():.2e}, max {dkl.max():.2e} (mean KL {np.mean(ex['_kl']):.3f})")
    if args.json:
        clean = {k: {f: v for f, v in r.items() if not f.startswith("_")} for k, r in rows.items()}
        clean["float16_kl_abs_diff"] = {"mean": float(dkl.mean()), "max": float(dkl.max())}
        args.json.write_text(json.dumps(clean, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

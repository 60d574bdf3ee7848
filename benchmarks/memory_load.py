"""Many phase-1 workers against one memory server (issue 13): throughput, latency and server CPU vs N.

Each worker is a process with its own MemoryClient sending what one trainer process sends per phase-1
step (trainer/step.py): a `query` of B rows with k neighbours, the targets (for KL) and the neighbours'
keys, then an `update` of the same B rows (threshold, age noise, seed, item ids). Workers are paced at
`--rate` steps/s each (default: the H100's measured phase-1 rate with the in-process memory, 36.4
steps/s at batch 4, docs/measurements/gpu_h100_trainer.txt); a worker that falls behind sends its next
step at once (so past saturation the achieved rate is the server's capacity). For N = 1, 2, 4, 8, 16
the table gives offered and achieved steps/s, the p50/p99 latency of each op, and the CPU the server
process used (cores = CPU seconds / wall seconds), all from one run against one server.

The workers run on the same machine as the server: on this 2-core VM they compete with it for the
CPU, so the capacity figure is a lower bound for a server with cores of its own.

    python benchmarks/memory_load.py [--quick]  # m = 10,000, 3 s per N (make bench)
    python benchmarks/memory_load.py --full     # m = 100,000, 10 s per N
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_server.client import MemoryClient  # noqa: E402
from memory_server.launcher import start_server  # noqa: E402

DK, DV = 512, 313
H100_PHASE1_STEPS_S = 36.41  # docs/measurements/gpu_h100_trainer.txt: phase 1, in-process memory, batch 4


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker(endpoint: str, seed: int, rate: float, seconds: float, batch: int, k: int, barrier, results) -> None:
    rng = np.random.default_rng(seed)
    pool = 64  # distinct steps cycled through
    q = rng.standard_normal((pool, batch, DK)).astype(np.float32)
    q /= np.linalg.norm(q, axis=2, keepdims=True)
    v = rng.random((pool, batch, DV)).astype(np.float32) ** 8 + np.float32(1e-6)
    v /= v.sum(2, keepdims=True)
    ids = rng.integers(0, 1 << 40, (pool, batch))
    lat_q, lat_u, steps = [], [], 0
    with MemoryClient(endpoint, timeout_ms=60_000) as c:
        c.ping()
        barrier.wait(timeout=600)
        t0 = time.perf_counter()
        while True:
            due = t0 + steps / rate
            now = time.perf_counter()
            if now - t0 >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            i = steps % pool
            t = time.perf_counter()
            c.query(q[i], k, targets=v[i], fields=("keys",))
            lat_q.append(time.perf_counter() - t)
            t = time.perf_counter()
            c.update(q[i], v[i], threshold=0.5, age_noise=4.0, seed=int(seed * 1_000_003 + steps), item_ids=ids[i])
            lat_u.append(time.perf_counter() - t)
            steps += 1
        wall = time.perf_counter() - t0
    results.put({"steps": steps, "wall": wall, "lat_q": lat_q, "lat_u": lat_u})


def run_n(endpoint: str, pid: int, n: int, rate: float, seconds: float, batch: int, k: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n + 1), ctx.Queue()  # passed at spawn (a Barrier cannot travel in a task)
    procs = [ctx.Process(target=worker, args=(endpoint, 1000 * n + i, rate, seconds, batch, k, barrier, results))
             for i in range(n)]
    for pr in procs:
        pr.start()
    try:
        barrier.wait(timeout=600)  # every worker connected: start the clock with them
        cpu0, t0 = cpu_seconds(pid), time.perf_counter()
        out = [results.get(timeout=seconds + 600) for _ in procs]
        cpu1, wall = cpu_seconds(pid), time.perf_counter() - t0
    finally:
        for pr in procs:
            pr.join(timeout=30)
            if pr.is_alive():
                pr.kill()
    lat_q = np.concatenate([r["lat_q"] for r in out]) * 1e3
    lat_u = np.concatenate([r["lat_u"] for r in out]) * 1e3
    steps = sum(r["steps"] for r in out)
    return {"n": n, "offered_steps_s": n * rate, "steps_s": steps / max(r["wall"] for r in out),
            "query_p50_ms": float(np.percentile(lat_q, 50)), "query_p99_ms": float(np.percentile(lat_q, 99)),
            "update_p50_ms": float(np.percentile(lat_u, 50)), "update_p99_ms": float(np.percentile(lat_u, 99)),
            "server_cores": (cpu1 - cpu0) / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="m = 10,000, 3 s per N (the default)")
    size.add_argument("--full", action="store_true", help="m = 100,000, 10 s per N")
    p.add_argument("--capacity", type=int, default=None, help="memory slots (overrides the size)")
    p.add_argument("--rate", type=float, default=H100_PHASE1_STEPS_S, help="phase-1 steps/s per worker")
    p.add_argument("--batch", type=int, default=4, help="rows per step (per-GPU batch)")
    p.add_argument("--k", type=int, default=256, help="neighbours per query row")
    p.add_argument("--seconds", type=float, default=None, help="per N (overrides the size)")
    p.add_argument("--workers", default="1,2,4,8,16", help="the values of N")
    p.add_argument("--server-args", default="--backend faiss", help="extra flags of the server")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    m = args.capacity or (100_000 if args.full else 10_000)
    seconds = args.seconds or (10.0 if args.full else 3.0)
    ns = [int(x) for x in args.workers.split(",")]
    srv = start_server(None, durability="none", capacity=m, key_dim=DK, value_dim=DV,
                       extra_args=["--seed", "1", *args.server_args.split()])
    rows = []
    try:
        for n in ns:
            rows.append(run_n(srv.endpoint, srv.pid, n, args.rate, seconds, args.batch, args.k))
            r = rows[-1]
            print(f"  N={n}: {r['steps_s']:.1f} steps/s of {r['offered_steps_s']:.1f} offered, "
                  f"server {r['server_cores']:.2f} cores", file=sys.stderr, flush=True)
    finally:
        srv.stop()
    print(f"\nLoad test: one server (m = {m:,}, dk {DK}, dv {DV}, {args.server_args}, durability none), N workers "
          f"each at {args.rate:g} steps/s (query {args.batch} x k={args.k} with targets and keys, then update "
          f"{args.batch} rows), {seconds:g} s per N, {os.cpu_count()} cores shared by server and workers\n")
    print("| N | offered steps/s | achieved steps/s | query p50 / p99 ms | update p50 / p99 ms | server CPU (cores) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']} | {r['offered_steps_s']:.0f} | {r['steps_s']:.1f} | {r['query_p50_ms']:.1f} / "
              f"{r['query_p99_ms']:.1f} | {r['update_p50_ms']:.1f} / {r['update_p99_ms']:.1f} | {r['server_cores']:.2f} |")
    best = max(r["steps_s"] for r in rows)
    print(f"\nmost steps/s served: {best:.1f} = {best / args.rate:.1f} workers at {args.rate:g} steps/s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

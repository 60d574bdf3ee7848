"""Memory-server benchmark (issue 3): search, update, wire bytes, restart, overload; one table.

Every end-to-end figure has its baseline measured in the same run: the same query on an identical
in-process store (InProcessMemory, same seed), and the machine's sgemm rate for the compute bound of
SYSTEMS.md 3.3. In-process and server runs are interleaved round by round and medians reported, because
this shared VM's speed swings several-fold over minutes.

    python benchmarks/memory_server.py            # full: m = 1e4 and 1e5 (several minutes on 2 cores)
    python benchmarks/memory_server.py --quick    # m = 1e4 only, fewer repetitions (< 1 minute)
    python benchmarks/memory_server.py --backend torch   # torch backend (CUDA when present)
    python benchmarks/memory_server.py --backend torch --key-dtype bfloat16   # + recall vs float32 keys

With --key-dtype tf32|bfloat16 the search table also times exact float32 search on the same keys and
queries (interleaved with the rest) and reports the top-k recall of the reduced-precision search
against it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the server sets it, so the baseline matches
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory_server.backends import (  # noqa: E402
    KEY_DTYPE_CHOICES,
    BackendUnavailable,
    IndexOptions,
    check_index_options,
    make_searcher,
    resolve_backend,
)
from memory_server.client import MemoryClient  # noqa: E402
from memory_server.durability import Durability, DurabilityConfig  # noqa: E402
from memory_server.effects import UpdateEffect  # noqa: E402
from memory_server.launcher import start_server  # noqa: E402
from memory_server.local import InProcessMemory  # noqa: E402
from memory_server.protocol import DEFAULT_MAX_MEMORY_BYTES  # noqa: E402
from memory_server.store import MemoryStore  # noqa: E402

DK, DV, NQ = 512, 313, 256


def sgemm_rate(backend: str) -> tuple[float, str]:
    """Best fp32 GEMM rate (FLOP/s) of this machine, measured in a child process so BLAS threads spinning
    after the GEMM cannot slow the searches measured here; on CUDA, torch fp32 matmul on the device."""
    if backend == "torch":
        import torch  # noqa: PLC0415
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = False
            a = torch.randn(8192, 8192, device="cuda")
            for _ in range(3):
                a @ a
            torch.cuda.synchronize()
            best = 1e9
            for _ in range(10):
                t = time.perf_counter()
                a @ a
                torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            return 2 * 8192**3 / best, "torch fp32 matmul 8192^3 on " + torch.cuda.get_device_name()
    code = ("import numpy as np, time\na = np.random.rand(2048, 2048).astype(np.float32)\nb = a @ a\nbest = 9e9\n"
            "for _ in range(8):\n    t = time.perf_counter(); a @ a; best = min(best, time.perf_counter() - t)\n"
            "print(2 * 2048**3 / best)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip()), "numpy sgemm 2048^3 (OpenBLAS, all cores)"


class SearchTimer:
    """Wraps a memory's real searcher and adds up the time spent in it (to split an update's cost)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0
        self.name = inner.name

    def search(self, q, k):
        t = time.perf_counter()
        try:
            return self.inner.search(q, k)
        finally:
            self.seconds += time.perf_counter() - t

    def keys_written(self, slots) -> None:
        self.inner.keys_written(slots)

    def close(self) -> None:
        self.inner.close()


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def pct(xs: list[float], p: float) -> float:
    return float(np.percentile(np.asarray(xs), p))


def unit_rows(rng: np.random.Generator, n: int, d: int = DK) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def targets(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.random((n, DV)) * (rng.random((n, DV)) < 0.1)
    v[:, 0] += 1e-3
    return (v / v.sum(1, keepdims=True)).astype(np.float32)


def local_memory(m: int, backend: str, key_dtype: str) -> InProcessMemory:
    """The in-process baseline: the store the server builds for these flags, seed 1 like the servers'."""
    store = MemoryStore(resolve_backend(backend), DEFAULT_MAX_MEMORY_BYTES, index=IndexOptions(key_dtype=key_dtype))
    return InProcessMemory(store, capacity=m, key_dim=DK, value_dim=DV, seed=1)


def server_flags(backend: str, key_dtype: str, *more: str) -> list[str]:
    return ["--seed", "1", "--backend", backend, "--key-dtype", key_dtype, *more]


# ---- recall of reduced-precision keys against float32 search ---------------------------------------

def recall_against(slots: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(recall@1, recall@k) of top-k `slots` [B, k] against the reference top-k `ref` [B, k]: the share of
    rows whose first slot agrees, and the mean share of the reference's k slots that were found."""
    k = ref.shape[1]
    r1 = float(np.mean(slots[:, 0] == ref[:, 0]))
    rk = float(np.mean([np.intersect1d(a, b).size / k for a, b in zip(slots, ref, strict=True)]))
    return r1, rk


def key_dtype_recall(keys: np.ndarray, q: np.ndarray, k: int, backend: str, key_dtype: str) -> dict:
    """Top-k recall of `key_dtype` search against exact float32 search on the same resolved backend
    (torch-cuda float32 is strict fp32: no TF32), same keys [m, dk] and unit queries [B, dk]."""
    check_index_options(backend, IndexOptions(key_dtype=key_dtype))
    low, ref = make_searcher(backend, keys, IndexOptions(key_dtype=key_dtype)), make_searcher(backend, keys)
    try:
        r1, rk = recall_against(low.search(q, k)[1], ref.search(q, k)[1])
    finally:
        low.close()
        ref.close()
    return {"key_dtype": key_dtype, "k": k, "recall_at_1": r1, "recall_at_k": rk}


# ---- search -------------------------------------------------------------------------------------

def pipelined_seconds(endpoint: str, q: np.ndarray, k: int, n: int, depth: int = 2) -> float:
    """Seconds per request with `depth` requests in flight on one DEALER (transport overlaps compute)."""
    import msgpack  # noqa: PLC0415
    import zmq  # noqa: PLC0415
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    head = {"v": 1, "op": "query", "args": {"k": k}, "arrays": [["q", "float32", list(q.shape)]]}
    t = time.perf_counter()
    for i in range(n + depth):
        if i < n:
            sock.send_multipart([msgpack.packb({**head, "id": i}), q], copy=False)
        if i >= depth - 1 and i - depth + 1 < n:
            assert msgpack.unpackb(sock.recv_multipart()[0])["ok"]
    dt = (time.perf_counter() - t) / n
    sock.close(0)
    return dt


def bench_search(m: int, backend: str, rounds: int, reps: int, tmp: Path, rate: float,
                 key_dtype: str = "float32") -> list[dict]:
    rng = np.random.default_rng(0)
    q = unit_rows(rng, NQ)
    local = local_memory(m, backend, key_dtype)
    mem = local.store.memories["default"]
    # Exact float32 search on the same keys: the time baseline of a reduced dtype (recall: key_dtype_recall).
    f32 = mem.searcher if key_dtype == "float32" else make_searcher(local.store.backend, mem.keys)
    flags = server_flags(backend, key_dtype)
    tcp = start_server(None, durability="none", capacity=m, key_dim=DK, value_dim=DV, extra_args=flags)
    ipc = start_server(None, bind=f"ipc://{tmp}/bench-{os.getpid()}.sock", durability="none", capacity=m,
                       key_dim=DK, value_dim=DV, extra_args=flags)
    rows = []
    q_hat = q.copy()  # already unit rows: what the engine hands the search
    try:
        clients = {"tcp": MemoryClient(tcp.endpoint, timeout_ms=600_000),
                   "ipc": MemoryClient(ipc.endpoint, timeout_ms=600_000)}
        for k in (1, 256):
            # Same store content, same answers (reported, not asserted, so a device run is never lost).
            same = all(np.array_equal(c.query(q, k)["slots"], local.query(q, k)["slots"]) for c in clients.values())
            rec = key_dtype_recall(mem.keys, q_hat, k, local.store.backend, key_dtype)
            calls = {"search": lambda k=k: mem.search(q_hat, k), "inproc": lambda k=k: local.query(q, k),
                     **{n: (lambda c=c, k=k: c.query(q, k)) for n, c in clients.items()}}
            if f32 is not mem.searcher:
                calls["f32"] = lambda k=k: f32.search(q_hat, k)
            times: dict[str, list[float]] = {n: [] for n in calls}
            faults = minor_faults()
            for _ in range(rounds * reps):  # one call of each in turn: all see the same machine load
                for name, fn in calls.items():
                    times[name] += timed(fn, 1)
            faults = (minor_faults() - faults) / (rounds * reps)
            med = {n: pct(t, 50) for n, t in times.items()}
            piped = pipelined_seconds(tcp.endpoint, q, k, n=rounds * reps)
            bound = 2 * NQ * m * DK / rate
            f32_ms = med.get("f32", med["search"]) * 1e3
            rows.append({"m": m, "k": k, "key_dtype": key_dtype, "search_ms": med["search"] * 1e3,
                         "f32_search_ms": f32_ms, "f32_ratio": f32_ms / (med["search"] * 1e3),
                         "recall_at_1": rec["recall_at_1"], "recall_at_k": rec["recall_at_k"], "bound_ms": bound * 1e3,
                         "pct_of_bound": 100 * bound / med["search"], "inproc_ms": med["inproc"] * 1e3,
                         "tcp_ms": med["tcp"] * 1e3, "ipc_ms": med["ipc"] * 1e3,
                         "tcp_ratio": med["inproc"] / med["tcp"], "ipc_ratio": med["inproc"] / med["ipc"],
                         "piped_ratio": med["inproc"] / piped,
                         "tcp_p99_ms": pct(times["tcp"], 99) * 1e3, "faults": faults, "same_answers": same})
        for c in clients.values():
            c.close()
    finally:
        tcp.stop()
        ipc.stop()
        if f32 is not mem.searcher:
            f32.close()
        local.close()
    return rows


# ---- update -------------------------------------------------------------------------------------

def update_batches(n: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """n update payloads: half the rows revisit a pool of 'images' (hits once stored), half are new (misses)."""
    rng = np.random.default_rng(seed)
    pool_q, pool_v = unit_rows(rng, 4 * NQ), targets(rng, 4 * NQ)
    out = []
    for _ in range(n):
        pick = rng.integers(0, 4 * NQ, NQ // 2)
        out.append((np.concatenate([pool_q[pick], unit_rows(rng, NQ // 2)]),
                    np.concatenate([pool_v[pick], targets(rng, NQ // 2)])))
    return out


def bench_update(m: int, backend: str, reps: int, tmp: Path, key_dtype: str = "float32") -> list[dict]:
    batches = update_batches(reps + 1, seed=1)
    rows = []
    local = local_memory(m, backend, key_dtype)
    mem = local.store.memories["default"]
    mem.searcher = timer = SearchTimer(mem.searcher)
    t, rule = [], []
    for i in range(reps):
        timer.seconds = 0.0
        t += timed(lambda i=i: local.update(*batches[i], threshold=1.0, age_noise=4.0), 1)
        rule.append(t[-1] - timer.seconds)
    rows.append({"m": m, "mode": "in-process (no log)", "p50_ms": pct(t, 50) * 1e3, "p99_ms": pct(t, 99) * 1e3,
                 "rule_p50_ms": pct(rule, 50) * 1e3, "rule_p99_ms": pct(rule, 99) * 1e3})
    for durability in ("none", "batch", "always"):
        data = tmp / f"upd-{m}-{durability}"
        srv = start_server(data if durability != "none" else None, durability=durability, capacity=m, key_dim=DK,
                           value_dim=DV, extra_args=server_flags(backend, key_dtype,
                                                                 "--snapshot-wal-bytes", str(1 << 40)))
        try:
            with MemoryClient(srv.endpoint, timeout_ms=600_000) as c:
                c.update(*batches[reps], threshold=1.0)
                t = [timed(lambda i=i: c.update(*batches[i], threshold=1.0, age_noise=4.0), 1)[0]
                     for i in range(reps)]
        finally:
            srv.kill()  # no final snapshot: it is not what is measured
        rows.append({"m": m, "mode": f"tcp, durability {durability}", "p50_ms": pct(t, 50) * 1e3,
                     "p99_ms": pct(t, 99) * 1e3, "rule_p50_ms": float("nan"), "rule_p99_ms": float("nan")})
    return rows


# ---- bytes on the wire per phase-1 step -----------------------------------------------------------

def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(memsrv_\w+_bytes_total\{[^}]*\}) (\S+)$", text, re.M)}


def bench_wire(backend: str, m: int = 10_000, batch: int = 4, k: int = 256, key_dtype: str = "float32") -> list[dict]:
    rng = np.random.default_rng(2)
    srv = start_server(None, durability="none", capacity=m, key_dim=DK, value_dim=DV,
                       extra_args=server_flags(backend, key_dtype, "--metrics-port", "0"))
    rows = []
    try:
        with MemoryClient(srv.endpoint, timeout_ms=600_000) as c:
            port = c.info()["metrics_port"]
            for label, fields in (("query keys for the loss (fields=['keys'])", ["keys"]),
                                  ("query slots/sims/kl only", [])):
                q, v = unit_rows(rng, batch), targets(rng, batch)
                before = scrape(port)
                c.query(q, k, targets=v, fields=fields)
                c.update(q, v, threshold=1.5, age_noise=4.0)
                after = scrape(port)
                d = {key: after[key] - before.get(key, 0.0) for key in after}
                req = sum(val for key, val in d.items() if "request_bytes" in key and 'op="info"' not in key)
                rep = sum(val for key, val in d.items() if "response_bytes" in key and 'op="info"' not in key)
                rows.append({"variant": label, "request_bytes": req, "reply_bytes": rep,
                             "total_mib": (req + rep) / 2**20})
    finally:
        srv.stop()
    return rows


# ---- restart to serving --------------------------------------------------------------------------

def bench_restart(m: int, n_updates: int, backend: str, tmp: Path, key_dtype: str = "float32") -> dict:
    data = tmp / f"restart-{m}"
    srv = start_server(data, capacity=m, key_dim=DK, value_dim=DV, extra_args=server_flags(backend, key_dtype))
    with MemoryClient(srv.endpoint, timeout_ms=600_000) as c:
        version = c.snapshot()["version"]
    srv.stop()
    snap_bytes = sum(p.stat().st_size for p in data.glob("snap-*/**/*") if p.is_file())
    # The WAL records a 4-row update produces (the trainer's batch), logged through the server's own
    # Durability: generating them through the server would cost 10,000 exact searches over m keys.
    rng = np.random.default_rng(3)
    seg = sorted(data.glob("wal-*.log"))[-1]
    log, store = Durability(DurabilityConfig(data_dir=data, mode="always")), MemoryStore(resolve_backend(backend))
    log.open(store)
    for i in range(n_updates):
        slots = rng.choice(m, 4, replace=False).astype(np.int64)
        eff = UpdateEffect("default", version + i + 1, f"bench-{i}", slots, unit_rows(rng, 4), slots[2:],
                           targets(rng, 2), np.arange(2, dtype=np.int64), np.array([1, 1, 0, 0], bool), slots)
        log.log(eff)
    log.commit()
    log.close(store, final_snapshot=False)
    wal_bytes = seg.stat().st_size
    q = unit_rows(rng, NQ)
    t0 = time.perf_counter()
    srv = start_server(data, extra_args=["--backend", backend, "--key-dtype", key_dtype])
    t_ready = time.perf_counter() - t0
    with MemoryClient(srv.endpoint, timeout_ms=600_000) as c:
        got = c.query(q, 1)["version"]
    t_first = time.perf_counter() - t0
    srv.kill()
    found = re.search(r"recovered .* in ([0-9.]+) s", srv.log_tail(20_000))
    recovery_s = float(found.group(1)) if found else float("nan")
    assert got == version + n_updates, (got, version + n_updates)
    return {"m": m, "updates": n_updates, "snapshot_mib": snap_bytes / 2**20, "wal_mib": wal_bytes / 2**20,
            "ready_s": t_ready, "first_query_s": t_first, "recovery_s": recovery_s}


# ---- 4 clients -----------------------------------------------------------------------------------

def _client_worker(endpoint: str, seconds: float, seed: int, m: int) -> tuple[list[float], int]:
    import msgpack  # noqa: PLC0415
    import zmq  # noqa: PLC0415
    q = unit_rows(np.random.default_rng(seed), NQ)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    head = {"v": 1, "op": "query", "args": {"k": 1}, "arrays": [["q", "float32", [NQ, DK]]]}
    lat, busy, i = [], 0, 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        i += 1
        t = time.perf_counter()
        sock.send_multipart([msgpack.packb({**head, "id": i}), q], copy=False)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        if reply["ok"]:
            lat.append(time.perf_counter() - t)
        else:
            busy += 1
            time.sleep(0.005)  # back off as MemoryClient does
    sock.close(0)
    return lat, busy


def bench_clients(m: int, backend: str, seconds: float, max_queue: int, key_dtype: str = "float32") -> dict:
    srv = start_server(None, durability="none", capacity=m, key_dim=DK, value_dim=DV,
                       extra_args=server_flags(backend, key_dtype, "--max-queue", str(max_queue)))
    try:
        with multiprocessing.get_context("spawn").Pool(4) as pool:
            res = pool.starmap(_client_worker, [(srv.endpoint, seconds, s, m) for s in range(4)])
    finally:
        srv.stop()
    lat = [x for r, _ in res for x in r]
    busy = sum(b for _, b in res)
    return {"m": m, "max_queue": max_queue, "req_s": len(lat) / seconds, "p50_ms": pct(lat, 50) * 1e3,
            "p99_ms": pct(lat, 99) * 1e3, "busy_share": busy / max(1, busy + len(lat))}


# ---- report --------------------------------------------------------------------------------------

def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |"
    sep = "|" + "|".join("---" for _ in cols) + "|"
    body = ["| " + " | ".join(format(r[c[0]], c[2]) if isinstance(r[c[0]], float) else str(r[c[0]]) for c in cols)
            + " |" for r in rows]
    return "\n".join([head, sep, *body])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="m = 1e4 only, fewer repetitions (< 1 minute)")
    ap.add_argument("--backend", default="faiss", choices=("faiss", "torch", "auto"))
    ap.add_argument("--key-dtype", default="float32", choices=KEY_DTYPE_CHOICES,
                    help="the servers' and the in-process baseline's --key-dtype (torch backend); a reduced "
                         "dtype also reports its top-k recall and search time against float32 keys")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.key_dtype != "float32":
        try:  # before minutes of benchmarking: the server would refuse these flags at start
            check_index_options(resolve_backend(args.backend), IndexOptions(key_dtype=args.key_dtype))
        except BackendUnavailable as exc:
            ap.error(str(exc))
    return args


def main() -> None:
    args = parse_args()
    sizes = [10_000] if args.quick else [10_000, 100_000]
    tmp = Path(tempfile.mkdtemp(prefix="memsrv-bench-"))
    rate, rate_how = sgemm_rate(args.backend)
    rates = [rate]
    out: dict = {"backend": args.backend, "key_dtype": args.key_dtype, "sgemm_gflops": rate / 1e9, "sgemm": rate_how,
                 "search": [], "update": []}
    for m in sizes:
        big = m >= 100_000
        rates.append(sgemm_rate(args.backend)[0])
        out["search"] += bench_search(m, args.backend, rounds=2 if args.quick else 3,
                                      reps=2 if big else (4 if args.quick else 8), tmp=tmp, rate=rate,
                                      key_dtype=args.key_dtype)
    for m in sizes:
        out["update"] += bench_update(m, args.backend, reps=10 if m >= 100_000 else (20 if args.quick else 60), tmp=tmp,
                                      key_dtype=args.key_dtype)
    out["wire"] = bench_wire(args.backend, key_dtype=args.key_dtype)
    out["restart"] = bench_restart(sizes[-1], 1_000 if args.quick else 10_000, args.backend, tmp, args.key_dtype)
    out["clients"] = [bench_clients(10_000, args.backend, 2.0 if args.quick else 6.0, mq, args.key_dtype)
                      for mq in (1, 64)]
    # recall@1 and recall@256 of this key dtype against exact float32 search (the k = 256 search rows).
    out["recall"] = [{"m": r["m"], "k": r["k"], "recall_at_1": r["recall_at_1"], "recall_at_k": r["recall_at_k"]}
                     for r in out["search"] if r["k"] > 1]
    rates.append(sgemm_rate(args.backend)[0])
    rate = max(rates)  # the best GEMM rate seen during the run is the machine's rate
    out["sgemm_gflops"], out["sgemm_samples_gflops"] = rate / 1e9, [r / 1e9 for r in rates]
    for row in out["search"]:
        row["bound_ms"] = 2 * NQ * row["m"] * DK / rate * 1e3
        row["pct_of_bound"] = 100 * row["bound_ms"] / row["search_ms"]

    print(f"\nMemory server benchmark, backend {args.backend}, --key-dtype {args.key_dtype}; compute bound (fp32) "
          f"from {rate_how}: best of "
          f"{len(rates)} samples {rate / 1e9:.0f} GFLOP/s (samples {', '.join(f'{r / 1e9:.0f}' for r in rates)})")
    print(f"{NQ} queries/request, d={DK}; ratio = in-process time / end-to-end time (throughput ratio)\n")
    print(table(out["search"], [("m", "m", "d"), ("k", "k", "d"), ("search_ms", "search ms", ".1f"),
                                ("bound_ms", "bound ms", ".1f"), ("pct_of_bound", "% of bound", ".0f"),
                                ("inproc_ms", "in-process ms", ".1f"), ("tcp_ms", "tcp ms", ".1f"),
                                ("tcp_ratio", "tcp ratio", ".2f"), ("ipc_ms", "ipc ms", ".1f"),
                                ("ipc_ratio", "ipc ratio", ".2f"), ("piped_ratio", "tcp 2-in-flight ratio", ".2f"),
                                ("tcp_p99_ms", "tcp p99 ms", ".1f"),
                                ("faults", "page faults/call", ".1f"), ("same_answers", "same slots", "")]))
    if args.key_dtype != "float32":
        print(f"\n--key-dtype {args.key_dtype} vs exact float32 search on the same keys and queries (same process, "
              "interleaved; speedup = float32 ms / this dtype's ms)\n")
        print(table(out["search"], [("m", "m", "d"), ("k", "k", "d"), ("search_ms", f"{args.key_dtype} ms", ".1f"),
                                    ("f32_search_ms", "float32 ms", ".1f"), ("f32_ratio", "speedup", ".2f"),
                                    ("recall_at_1", "recall@1", ".4f"), ("recall_at_k", "recall@k", ".4f")]))
    print(f"\nUpdate, {NQ} rows, age_noise 4 ('rule' = the update without its k=1 search, timed inside the "
          f"same in-process calls)\n")
    print(table(out["update"], [("m", "m", "d"), ("mode", "mode", "s"), ("p50_ms", "p50 ms", ".2f"),
                                ("p99_ms", "p99 ms", ".2f"), ("rule_p50_ms", "rule p50 ms", ".2f"),
                                ("rule_p99_ms", "rule p99 ms", ".2f")]))
    print("\nBytes on the wire per phase-1 step (batch 4, k=256: one query with targets + one update)\n")
    print(table(out["wire"], [("variant", "variant", "s"), ("request_bytes", "request B", ".0f"),
                              ("reply_bytes", "reply B", ".0f"), ("total_mib", "MiB/step", ".3f")]))
    r = out["restart"]
    print(f"\nRestart to serving, m={r['m']}: snapshot {r['snapshot_mib']:.0f} MiB + {r['updates']} logged 4-row "
          f"updates ({r['wal_mib']:.1f} MiB WAL): READY after {r['ready_s']:.2f} s, first query answered after "
          f"{r['first_query_s']:.2f} s (snapshot load + replay inside the server: {r['recovery_s']:.2f} s)\n")
    print(table(out["clients"], [("m", "m", "d"), ("max_queue", "--max-queue", "d"), ("req_s", "req/s", ".1f"),
                                 ("p50_ms", "admitted p50 ms", ".1f"), ("p99_ms", "admitted p99 ms", ".1f"),
                                 ("busy_share", "busy share", ".2f")]))
    print("(4 client processes, k=1, 256 queries/request)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

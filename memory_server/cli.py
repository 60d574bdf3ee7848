"""The server's command line: flags -> recovery -> READY line -> serve (run via memory_server.__main__).

Exit codes: 0 clean stop (SIGTERM/SIGINT, after a final snapshot), 1 the final snapshot failed (the
WAL still holds every acknowledged request), 2 bad flags, refused bind or unusable --data-dir,
3 internal invariant broken or WAL fsync failed (no snapshot; the WAL is the truth), 4 unrecoverable
data dir, 5 data dir locked by another server. Only the READY line goes to stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from .backends import (
    BACKEND_CHOICES,
    INDEX_CHOICES,
    KEY_DTYPE_CHOICES,
    BackendUnavailable,
    IndexOptions,
    check_index_options,
    import_faiss,
    resolve_backend,
)
from .durability import (
    DURABILITY_MODES,
    DataDirLocked,
    DataDirUnusable,
    Durability,
    DurabilityConfig,
    RecoveryError,
)
from .engine import Engine, FatalError, Limits
from .metrics import Metrics
from .protocol import (
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_MEMORIES,
    DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MEMORY,
    MemoryServerError,
)
from .server import BindRefused, Server, ServerConfig, check_bind_policy
from .store import VALUE_DTYPE_CHOICES, MemoryStore

log = logging.getLogger("memory_server")


def build_parser() -> argparse.ArgumentParser:
    """The server's command-line flags."""
    p = argparse.ArgumentParser(prog="pccnet-memory-server", description=__doc__.splitlines()[0])
    p.add_argument("--bind", default=DEFAULT_ENDPOINT, help="tcp://HOST:PORT (port 0: pick one) or ipc://PATH")
    p.add_argument("--data-dir", type=Path, help="WAL + snapshots (required unless --durability none)")
    p.add_argument("--capacity", type=int, help="create memory 'default' with this many slots if absent")
    p.add_argument("--key-dim", type=int, help="key dimension of memory 'default'")
    p.add_argument("--value-dim", type=int, help="value dimension of memory 'default'")
    p.add_argument("--seed", type=int, default=None, help="seed of memory 'default' keys (default: random)")
    p.add_argument("--durability", choices=DURABILITY_MODES, default="always")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto")
    p.add_argument("--threads", type=int, default=0, help="search threads (faiss OpenMP); 0 = all cores")
    p.add_argument("--index", choices=INDEX_CHOICES, default="exact",
                   help="approximate: a FAISS IVF index (faiss-cpu backend) with an exact re-rank of its candidates")
    p.add_argument("--ivf-nprobe", type=int, default=None,
                   help="--index approximate: IVF lists probed per query (default 1/128 of them, at least 8)")
    p.add_argument("--key-dtype", choices=KEY_DTYPE_CHOICES, default="float32",
                   help="torch backend: matmul precision of the search (tf32 on CUDA; bfloat16 keeps a bf16 mirror)")
    p.add_argument("--value-dtype", choices=VALUE_DTYPE_CHOICES, default="float32",
                   help="how values are held (float16 halves them; replies stay float32)")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus on 127.0.0.1:P (0 picks one)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="per frame, per request and per reply")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="rows per request")
    p.add_argument("--max-memory-bytes", type=int, default=DEFAULT_MAX_MEMORY_BYTES,
                   help="every byte all memories hold (arrays, scratch, windows, search structures)")
    p.add_argument("--max-memories", type=int, default=DEFAULT_MAX_MEMORIES, help="memories held at once")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests beyond this get 'busy'")
    p.add_argument("--max-queue-bytes", type=int, default=None,
                   help="bytes of queued requests beyond which new ones get 'busy' (default 4 x --max-message-bytes)")
    p.add_argument("--max-send-bytes", type=int, default=None,
                   help="bytes of replies waiting for slow clients (default 4 x --max-message-bytes)")
    p.add_argument("--snapshot-wal-bytes", type=int, default=512 * 1024 * 1024,
                   help="snapshot when the log since the last snapshot exceeds this")
    p.add_argument("--snapshot-interval-s", type=float, default=300.0,
                   help="snapshot at least this often while there are changes")
    p.add_argument("--snapshot-mode", choices=("fork", "sync"), default="fork",
                   help="fork: a child writes snapshots while serving continues; sync: in the loop")
    p.add_argument("--lock-timeout-s", type=float, default=10.0, help="wait this long for the data-dir lock")
    p.add_argument("--no-upgrade", action="store_true",
                   help="refuse (exit 4) a data dir of the previous format instead of upgrading it in place")
    p.add_argument("--curve-secret-key", type=Path, help="zmq.auth secret certificate of the server")
    p.add_argument("--curve-clients", type=Path, help="directory of authorised client public certificates")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback bind without CURVE")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    # Fault injection for the tests (hidden): hold a snapshot open before its rename; make ops raise a bug.
    p.add_argument("--fault-snapshot-pause-s", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--fault-internal-op", action="append", default=[], help=argparse.SUPPRESS)
    # ... make the next N snapshot forks fail with EAGAIN, the next N snapshot writes with ENOSPC.
    p.add_argument("--fault-fork-fail", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--fault-snapshot-fail", type=int, default=0, help=argparse.SUPPRESS)
    # ... SIGKILL the server at step N of a format-1 upgrade (legacy.py).
    p.add_argument("--fault-upgrade-kill-at", type=int, default=0, help=argparse.SUPPRESS)
    return p


def _check_flags(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags (None when they are usable)."""
    shape = (args.capacity, args.key_dim, args.value_dim)
    if any(x is not None for x in shape) and not all(x is not None for x in shape):
        return "--capacity, --key-dim and --value-dim go together"
    if args.durability != "none" and args.data_dir is None:
        return f"--durability {args.durability} needs --data-dir (or use --durability none)"
    positive = ("max_message_bytes", "max_batch", "max_memory_bytes", "max_memories", "max_queue",
                "max_queue_bytes", "max_send_bytes", "snapshot_wal_bytes")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.max_queue_bytes < args.max_message_bytes:
        return (f"--max-queue-bytes {args.max_queue_bytes} must be at least --max-message-bytes "
                f"{args.max_message_bytes} (or no request of the maximum size is ever admitted)")
    if args.snapshot_interval_s <= 0:
        return f"--snapshot-interval-s must be > 0, got {args.snapshot_interval_s}"
    return None


def _fail(code: int, message: str) -> int:
    log.error("%s", message)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run the server; returns the process exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every import at INFO
    for name in ("max_queue_bytes", "max_send_bytes"):
        if getattr(args, name) is None:
            setattr(args, name, 4 * args.max_message_bytes)
    problem = _check_flags(args)
    if problem is not None:
        return _fail(2, problem)
    server_cfg = ServerConfig(bind=args.bind, max_queue=args.max_queue, max_message_bytes=args.max_message_bytes,
                              max_queue_bytes=args.max_queue_bytes, max_send_bytes=args.max_send_bytes,
                              curve_secret_key=args.curve_secret_key, curve_clients=args.curve_clients,
                              insecure=args.insecure)
    try:
        check_bind_policy(server_cfg)
        backend = resolve_backend(args.backend)
        index_opts = IndexOptions(args.index, args.key_dtype, args.ivf_nprobe)
        check_index_options(backend, index_opts)
        if args.threads > 0 and backend.startswith("faiss"):
            import_faiss().omp_set_num_threads(args.threads)
    except (BindRefused, BackendUnavailable) as exc:
        return _fail(2, str(exc))
    metrics = Metrics(device="cuda" if backend in ("faiss-gpu", "torch-cuda") else "cpu")
    store = MemoryStore(backend, args.max_memory_bytes, args.max_memories, index_opts, args.value_dtype)
    durability = Durability(DurabilityConfig(
        data_dir=args.data_dir if args.durability != "none" else None, mode=args.durability,
        snapshot_wal_bytes=args.snapshot_wal_bytes, snapshot_interval_s=args.snapshot_interval_s,
        fork_snapshots=args.snapshot_mode == "fork", snapshot_pause_s=args.fault_snapshot_pause_s,
        lock_timeout_s=args.lock_timeout_s, fault_fork_failures=args.fault_fork_fail,
        fault_snapshot_failures=args.fault_snapshot_fail, upgrade=not args.no_upgrade,
        fault_upgrade_kill_at=args.fault_upgrade_kill_at), metrics)
    try:
        report = durability.open(store)
    except DataDirUnusable as exc:
        return _fail(2, str(exc))
    except DataDirLocked as exc:
        return _fail(5, str(exc))
    except RecoveryError as exc:
        return _fail(4, f"recovery failed: {exc}")
    log.info("recovered %s in %.3f s (snapshot %s, %d log records replayed%s)", report.memories or "no memories",
             report.seconds, report.snapshot_seq, report.records_replayed,
             f", {report.torn_tail}" if report.torn_tail else "")
    engine = Engine(store, durability, Limits(args.max_message_bytes, args.max_batch, args.max_memory_bytes), metrics)
    engine.fault_ops = frozenset(args.fault_internal_op)
    if args.capacity is not None:
        cargs = {"capacity": args.capacity, "key_dim": args.key_dim, "value_dim": args.value_dim}
        if args.seed is not None:
            cargs["seed"] = args.seed
        reply = engine.execute("create", "startup", DEFAULT_MEMORY, cargs, {})
        if reply.error is not None:
            durability.close(store, final_snapshot=False)
            return _fail(2, f"cannot create memory 'default' from flags: {reply.error}")
        try:
            durability.commit()
        except OSError as exc:
            return _fail(3, f"fdatasync of the write-ahead log failed: {exc}")
    server = Server(engine, server_cfg, metrics)
    try:
        endpoint = server.bind()
    except BindRefused as exc:
        durability.close(store, final_snapshot=False)
        return _fail(2, str(exc))
    if args.metrics_port is not None:
        engine.metrics_port = metrics.serve(args.metrics_port)
        log.info("metrics on http://127.0.0.1:%d/metrics", engine.metrics_port)

    def stop(signum: int, _frame: object) -> None:
        log.info("signal %d: finishing, snapshotting, exiting", signum)
        server.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving %s on %s (backend %s, index %s, key dtype %s, value dtype %s, durability %s)",
             sorted(store.memories), endpoint, backend, args.index, args.key_dtype, args.value_dtype, args.durability)
    print(f"READY {endpoint}", flush=True)
    try:
        final_ok = server.serve_forever()
    except (FatalError, MemoryServerError) as exc:
        log.critical("stopping without a snapshot: %s", exc, exc_info=True)
        server.close(linger_ms=0)
        return 3
    finally:
        metrics.close()
    if not final_ok:
        return _fail(1, "stopped, but the final snapshot failed: the write-ahead log still holds every "
                        "acknowledged request, and the next start replays it")
    log.info("stopped cleanly")
    return 0

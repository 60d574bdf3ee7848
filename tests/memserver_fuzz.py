"""Property-based fuzzing of a real memory server process (issue 10): requests from PROTOCOL.md's grammar
and mutations of valid requests, checked after each case against the server's own state.

After every case: the server answers (a well-formed reply, or no reply only when a frame is over the
per-frame limit), no memory changed unless the reply was `ok` for a mutating op (and then only the
memory it named, by exactly one version), a request built valid is answered `ok`, and the server's RSS
stays under a bound derived from its limits. `python tests/memserver_fuzz.py --minutes 10` (what `make
fuzz` runs) repeats the same property with fresh seeds for a fixed time, restarting the server on the
same data dir now and then to check recovery, and prints the counts; tests/test_memory_fuzz.py runs a
few hundred cases in the test suite.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import psutil
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from memory_server.launcher import ServerProcess, start_server  # noqa: E402
from memory_server.protocol import ERROR_CODES  # noqa: E402

M, DK, DV = 24, 8, 5  # memory "default"
MAX_MSG = 256 * 1024
SERVER_ARGS = ["--max-message-bytes", str(MAX_MSG), "--max-batch", "48", "--max-memories", "5",
               "--max-memory-bytes", str(4 << 20), "--seed", "11", "--snapshot-wal-bytes", str(256 * 1024)]
# RSS may exceed its value after start-up by the limits (memories 4 MiB, queue and replies 1 MiB each,
# libzmq's per-peer buffers) plus the transient work of one request and allocator slack.
RSS_SLACK = 96 << 20
NAMES = ["default", "fz1", "fz2"]
OPS = ["ping", "info", "create", "drop", "query", "update", "get", "put", "export", "snapshot", "stats"]
DTYPES = ["float32", "float16", "int64", "int32", "uint8", "bool"]
_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8,
       "bool": np.bool_}
SHAPES = {"default": (M, DK, DV), "fz1": (6, 3, 2), "fz2": (10, 4, 4)}


class Crash(AssertionError):
    """The server died or stopped answering."""


class Corruption(AssertionError):
    """A memory changed when it should not have, or recovery served other data."""


class Violation(AssertionError):
    """A reply broke the protocol (malformed, wrong id, a valid request refused, RSS over its bound)."""


@dataclass
class Case:
    """One fuzz request: its frames, whether it was built valid, and what a success may change."""

    frames: list[bytes]
    valid: bool
    op: Any = None
    memory: Any = "default"
    req_id: Any = None
    kind: str = ""


# ---- generation ---------------------------------------------------------------------------------------

def _case(frames: list[bytes], valid: bool, kind: str) -> Case:
    """A Case whose op, memory and id are read back from its (possibly mutated) header bytes."""
    try:
        header = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - any undecodable header
        header = None
    if not isinstance(header, dict):
        return Case(frames, valid, None, None, None, kind)
    return Case(frames, valid, header.get("op"), header.get("memory", "default"), header.get("id"), kind)


def _arr(a: np.ndarray) -> tuple[list[Any], bytes]:
    return [str(a.dtype) if a.dtype != np.bool_ else "bool", list(a.shape)], a.tobytes()


@st.composite
def valid_requests(draw: Any) -> Case:
    """A request that PROTOCOL.md says must succeed, given the memories the fuzzer keeps alive."""
    name = draw(st.sampled_from(NAMES))
    m, dk, dv = SHAPES[name]
    op = draw(st.sampled_from(["ping", "info", "stats", "query", "update", "get", "put", "export", "create"]))
    if name != "default" and op != "create":
        op = draw(st.sampled_from(["ping", "info", "stats"]))  # fz1/fz2 may not exist right now
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    b = draw(st.integers(0, 6))
    args: dict[str, Any] = {}
    arrays: list[tuple[str, np.ndarray]] = []
    if op == "create":
        args = {"capacity": m, "key_dim": dk, "value_dim": dv, "seed": 1}
    elif op == "query":
        args = {"k": draw(st.integers(1, m)), "fields": draw(st.lists(st.sampled_from(["keys", "values", "ages",
                                                                                        "item_ids"]), max_size=4))}
        arrays = [("q", rng.standard_normal((b, dk)).astype(np.float32) + 0.5)]
        if draw(st.booleans()):
            arrays.append(("targets", (rng.random((b, dv)) + 0.01).astype(np.float32)))
    elif op == "update":
        args = {"threshold": draw(st.floats(0, 1e6)), "age_noise": draw(st.floats(0, 1e6)),
                "seed": draw(st.integers(0, 2**63 - 1))}
        arrays = [("q", rng.standard_normal((b, dk)).astype(np.float32) + 0.5),
                  ("v", (rng.random((b, dv)) + 0.01).astype(np.float32))]
        if draw(st.booleans()):
            arrays.append(("item_ids", rng.integers(-2**63, 2**63 - 1, b, dtype=np.int64)))
    elif op == "get":
        arrays = [("slots", rng.integers(0, m, b).astype(np.int64))]
    elif op == "put":
        n = min(b, m)
        arrays = [("slots", rng.choice(m, n, replace=False).astype(np.int64)),
                  ("keys", rng.standard_normal((n, dk)).astype(np.float32) + 0.5),
                  ("values", (rng.random((n, dv)) + 0.01).astype(np.float32)),
                  ("ages", (rng.random(n) * 10).astype(np.float32)),
                  ("item_ids", rng.integers(-5, 5, n).astype(np.int64))]
    req_id = draw(st.one_of(st.integers(-2**63, 2**63 - 1), st.text(max_size=40)))
    header: dict[str, Any] = {"v": 1, "op": op, "id": req_id, "memory": name}
    if args:
        header["args"] = args
    specs, bufs = [], []
    for n_, a in arrays:
        spec, buf = _arr(a)
        specs.append([n_, *spec])
        bufs.append(buf)
    if specs:
        header["arrays"] = specs
    return _case([msgpack.packb(header, use_bin_type=True), *bufs], True, "valid")


_WIRE_INTS = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
_SCALARS = st.one_of(st.none(), st.booleans(), _WIRE_INTS,
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30), st.binary(max_size=30))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=5)),
                       max_leaves=12)
_DIMS = st.one_of(st.integers(0, 64), st.sampled_from([2**31 - 1, 2**31, 2**40, 2**62, 2**63, -1, -(2**31)]))


@st.composite
def grammar_requests(draw: Any) -> Case:
    """Headers and frames drawn from the protocol's grammar, each field valid or not."""
    header: dict[Any, Any] = {}
    if draw(st.floats(0, 1)) < 0.9:
        header["v"] = draw(st.one_of(st.just(1), _SCALARS))
    if draw(st.floats(0, 1)) < 0.9:
        header["op"] = draw(st.one_of(st.sampled_from(OPS), _SCALARS))
    if draw(st.floats(0, 1)) < 0.9:
        header["id"] = draw(st.one_of(_WIRE_INTS, st.text(max_size=300), _VALUES))
    if draw(st.booleans()):
        header["memory"] = draw(st.one_of(st.sampled_from(NAMES + ["", ".x", "../a", "a" * 65, "fz3"]), _SCALARS))
    if draw(st.booleans()):
        header["args"] = draw(st.one_of(st.dictionaries(
            st.sampled_from(["k", "fields", "threshold", "age_noise", "seed", "capacity", "key_dim", "value_dim", "zz"]),
            st.one_of(_VALUES, st.floats(), _WIRE_INTS), max_size=5), _VALUES))
    frames: list[bytes] = []
    if draw(st.booleans()):
        specs = draw(st.lists(st.one_of(
            st.tuples(st.sampled_from(["q", "v", "slots", "keys", "values", "ages", "item_ids", "targets", "x"]),
                      st.one_of(st.sampled_from(DTYPES), _SCALARS),
                      st.lists(_DIMS, max_size=9)).map(list), _VALUES), max_size=4))
        header["arrays"] = specs
        for spec in specs:
            size = 0
            if isinstance(spec, list) and len(spec) == 3 and isinstance(spec[1], str) and spec[1] in _NP \
                    and isinstance(spec[2], list) \
                    and all(isinstance(d, int) and 0 <= d < 2**20 for d in spec[2]):
                size = int(np.dtype(_NP[spec[1]]).itemsize * math.prod(spec[2]))
            if size > MAX_MSG // 2 or draw(st.floats(0, 1)) < 0.3:
                size = draw(st.integers(0, 512))  # a frame of the wrong size
            frames.append(draw(st.binary(min_size=size, max_size=size)) if size <= 64 else
                          np.random.default_rng(size).bytes(size))
    if draw(st.floats(0, 1)) < 0.2:
        frames.append(draw(st.binary(max_size=64)))
    return _case([msgpack.packb(header, use_bin_type=True), *frames], False, "grammar")


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    if not data:
        return data
    b = bytearray(data)
    b[pos % len(b)] ^= 1 << bit
    return bytes(b)


@st.composite
def mutated_requests(draw: Any) -> Case:
    """A valid request with one or two mutations: header fields, types, shapes, sizes, bytes, frames."""
    case = draw(valid_requests())
    header = msgpack.unpackb(case.frames[0], raw=False, strict_map_key=False)
    frames = list(case.frames[1:])
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["field", "drop_field", "arg", "shape", "dtype", "truncate_frame", "extend_frame",
                                     "drop_frame", "add_frame", "flip_frame", "nan", "flip_header", "cut_header",
                                     "big_id", "spec"]))
        case.kind = kind
        if kind == "field":
            header[draw(st.sampled_from(["v", "op", "id", "memory", "args", "arrays"]))] = draw(_VALUES)
        elif kind == "drop_field" and header:
            header.pop(draw(st.sampled_from(sorted(header))))
        elif kind == "arg":
            args = header.get("args") if isinstance(header.get("args"), dict) else {}
            key = draw(st.sampled_from(["k", "threshold", "age_noise", "seed", "fields", "capacity", "key_dim",
                                        "value_dim", "bogus"]))
            args[key] = draw(st.one_of(_VALUES, st.sampled_from([1e308, -1.0, 1e6 + 1, float("nan"), 2**63, -(2**63),
                                                                 0, 2**31, 10**9])))
            header["args"] = args
        elif kind in ("shape", "dtype", "spec") and isinstance(header.get("arrays"), list) and header["arrays"]:
            i = draw(st.integers(0, len(header["arrays"]) - 1))
            spec = header["arrays"][i]
            if kind == "shape" and isinstance(spec, list) and len(spec) == 3:
                spec[2] = draw(st.lists(_DIMS, max_size=9))
            elif kind == "dtype" and isinstance(spec, list) and len(spec) == 3:
                spec[1] = draw(st.one_of(st.sampled_from(DTYPES + ["float64", "complex64"]), _SCALARS))
            else:
                header["arrays"][i] = draw(_VALUES)
        elif kind == "truncate_frame" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            frames[i] = frames[i][: draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif kind == "extend_frame" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            frames[i] = frames[i] + draw(st.binary(min_size=1, max_size=16))
        elif kind == "drop_frame" and frames:
            frames.pop(draw(st.integers(0, len(frames) - 1)))
        elif kind == "add_frame":
            frames.append(draw(st.binary(max_size=64)))
        elif kind == "flip_frame" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            frames[i] = _flip(frames[i], draw(st.integers(0, 10**6)), draw(st.integers(0, 7)))
        elif kind == "nan" and frames:
            i = draw(st.integers(0, len(frames) - 1))
            word = draw(st.sampled_from([struct.pack("<f", float("nan")), struct.pack("<f", float("inf")),
                                         struct.pack("<f", -1.0), b"\0\0\0\0"]))
            if len(frames[i]) >= 4:
                pos = 4 * draw(st.integers(0, len(frames[i]) // 4 - 1))
                frames[i] = frames[i][:pos] + word + frames[i][pos + 4:]
        elif kind == "big_id":
            header["id"] = draw(st.sampled_from(["x" * 257, "é" * 200, 2**64 - 1, 2**63, 1.0, True,
                                                 list(range(1000))]))
    packed = msgpack.packb(header, use_bin_type=True)
    if case.kind == "flip_header":
        packed = _flip(packed, draw(st.integers(0, 10**6)), draw(st.integers(0, 7)))
    elif case.kind == "cut_header":
        packed = packed[: draw(st.integers(0, max(0, len(packed) - 1)))]
    return _case([packed, *frames], False, case.kind)


any_request = st.one_of(valid_requests(), mutated_requests(), grammar_requests())


# ---- checking -----------------------------------------------------------------------------------------

@dataclass
class Target:
    """A running server under fuzz, with the fingerprint of every memory after the last case."""

    endpoint: str
    pid: int
    rss_bound: int
    sock: Any = None
    state: dict[str, tuple[int, str]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {"cases": 0, "ok": 0, "errors": 0, "no_reply": 0})
    max_rss: int = 0

    def connect(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)

    def call(self, frames: list[bytes], timeout_s: float = 30.0) -> tuple[dict, list[bytes]] | None:
        self.sock.send_multipart(frames)
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        reply = self.sock.recv_multipart()
        if reply and reply[0] == b"" and len(reply) > 1:
            reply = reply[1:]  # the echoed delimiter of a request that began with an empty frame
        return msgpack.unpackb(reply[0], raw=False, strict_map_key=False), reply[1:]

    def _ok(self, op: str, memory: str | None = None) -> tuple[dict, list[bytes]]:
        head = {"v": 1, "op": op, "id": f"fz-{op}"}
        if memory is not None:
            head["memory"] = memory
        got = self.call([msgpack.packb(head, use_bin_type=True)])
        if got is None:
            raise Crash(f"no reply to {op} (server {'alive' if psutil.pid_exists(self.pid) else 'dead'})")
        if not got[0].get("ok"):
            raise Violation(f"{op} failed: {got[0]}")
        return got

    def fingerprint(self) -> dict[str, tuple[int, str]]:
        """Version and a hash of every array of every memory."""
        names = self._ok("info")[0]["result"]["memories"]
        out = {}
        for name in names:
            head, frames = self._ok("export", name)
            h = hashlib.sha256(json.dumps(head["arrays"]).encode())
            for f in frames:
                h.update(f)
            out[name] = (head["result"]["version"], h.hexdigest())
        return out

    def check(self, case: Case) -> None:
        """Send one case and check every property; raises Crash, Corruption or Violation."""
        if self.sock is None:
            self.connect()
            self.state = self.fingerprint()
        if "default" not in self.state:  # a fuzzed `drop` removed it: bring it back for the valid requests
            self.call([msgpack.packb(
                {"v": 1, "op": "create", "id": "fz-create", "args": dict(zip(("capacity", "key_dim", "value_dim"),
                                                                           SHAPES["default"], strict=True))})])
            self.state = self.fingerprint()
        self.counts["cases"] += 1
        too_big = any(len(f) > MAX_MSG for f in case.frames)
        got = self.call(case.frames, timeout_s=5.0 if too_big else 30.0)
        if got is None:
            if not psutil.pid_exists(self.pid) or psutil.Process(self.pid).status() == psutil.STATUS_ZOMBIE:
                raise Crash(f"the server died on a {case.kind} request")
            if not too_big:
                raise Crash(f"no reply to a {case.kind} request within 30 s")
            self.counts["no_reply"] += 1  # ZMQ_MAXMSGSIZE disconnected the peer, as documented
            self.connect()
            reply = None
        else:
            reply, arrays = got
            self._check_reply(case, reply, arrays)
        after = self.fingerprint()
        self._check_state(case, reply, after)
        self.state = after
        rss = psutil.Process(self.pid).memory_info().rss
        self.max_rss = max(self.max_rss, rss)
        if rss > self.rss_bound:
            raise Violation(f"server RSS {rss >> 20} MiB over its bound {self.rss_bound >> 20} MiB")

    def _check_reply(self, case: Case, reply: Any, arrays: list[bytes]) -> None:
        if not isinstance(reply, dict) or reply.get("v") != 1 or not isinstance(reply.get("ok"), bool):
            raise Violation(f"malformed reply {reply!r:.200}")
        if reply["ok"]:
            self.counts["ok"] += 1
            specs = reply.get("arrays", [])
            if len(specs) != len(arrays):
                raise Violation(f"reply lists {len(specs)} arrays and carries {len(arrays)} frames")
            for (name, dtype, shape), buf in zip(specs, arrays, strict=True):
                if len(buf) != np.dtype(_NP[dtype]).itemsize * math.prod(shape):
                    raise Violation(f"reply array {name} {dtype}{shape} has {len(buf)} bytes")
            if reply.get("id") != case.req_id or type(reply.get("id")) is not type(case.req_id):
                raise Violation(f"ok reply echoes id {reply.get('id')!r:.60}, sent {case.req_id!r:.60}")
        else:
            self.counts["errors"] += 1
            err = reply.get("error")
            if not isinstance(err, dict) or err.get("code") not in ERROR_CODES or not err.get("message"):
                raise Violation(f"malformed error {err!r:.200}")
            if len(err["message"]) > 2000:
                raise Violation(f"error message of {len(err['message'])} characters")
            if err["code"] == "internal":
                raise Violation(f"internal error (a server bug) on a {case.kind} request: {err['message']}")
            if case.valid and err["code"] not in ("too_large", "exists"):
                raise Violation(f"a valid {case.op} on {case.memory!r} was refused: {err}")

    def _check_state(self, case: Case, reply: dict | None, after: dict) -> None:
        before = self.state
        ok = reply is not None and reply.get("ok") is True
        if not ok or case.op not in ("create", "drop", "update", "put"):
            if after != before:
                raise Corruption(f"memories changed on a {'refused' if not ok else case.op} request ({case.kind}): "
                                 f"{sorted(set(before.items()) ^ set(after.items()))}")
            return
        name = case.memory
        changed = {n for n in set(before) | set(after) if before.get(n) != after.get(n)}
        if changed - {name}:
            raise Corruption(f"{case.op} on {name!r} changed {sorted(changed)}")
        if case.op == "create":
            if name in before and after.get(name) != before[name]:
                raise Corruption(f"an idempotent create changed {name!r}")
            if name not in before and (after.get(name) or (None,))[0] != 0:
                raise Corruption(f"create of {name!r} did not leave version 0")
        elif case.op == "drop":
            if name in after:
                raise Corruption(f"drop left {name!r}")
        else:
            v_before, v_reply = before[name][0], reply["result"]["version"]
            if v_reply <= v_before:  # a duplicate id: the first reply again, nothing applied
                if after[name] != before[name]:
                    raise Corruption(f"a duplicate {case.op} changed {name!r}")
            elif v_reply != v_before + 1 or after[name][0] != v_before + 1:
                raise Corruption(f"{case.op} took {name!r} from version {v_before} to {after[name][0]} "
                                 f"(reply {v_reply})")


def start_target(data_dir: Path, log_path: Path | None = None) -> tuple[ServerProcess, Target]:
    """A fuzz server on `data_dir` (batch durability: its log is replayed by the next start)."""
    srv = start_server(data_dir, capacity=M, key_dim=DK, value_dim=DV, durability="batch", extra_args=SERVER_ARGS,
                       log_path=log_path)
    rss = psutil.Process(srv.pid).memory_info().rss
    return srv, Target(srv.endpoint, srv.pid, rss + RSS_SLACK)


def fuzz_settings(examples: int, derandomize: bool) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def run_examples(target: Target, examples: int, derandomize: bool) -> None:
    """Run `examples` hypothesis cases against `target` (raises on the first property broken)."""

    @fuzz_settings(examples, derandomize)
    @given(case=any_request)
    def prop(case: Case) -> None:
        target.check(case)

    prop()


# ---- make fuzz ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Fuzz requests (and recovery) for --minutes; print the counts; exit 1 on any crash or corruption."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--recovery-share", type=float, default=0.25, help="share of the time for the recovery fuzzer")
    p.add_argument("--batch", type=int, default=500, help="cases per hypothesis run (a fresh seed each)")
    args = p.parse_args(argv)
    from memserver_recovery_fuzz import RecoveryFuzz  # noqa: PLC0415

    deadline = time.monotonic() + 60 * args.minutes * (1 - args.recovery_share)
    t0 = time.monotonic()
    totals = {"cases": 0, "ok": 0, "errors": 0, "no_reply": 0, "crashes": 0, "corruptions": 0, "violations": 0,
              "restarts": 0, "recovery_mismatches": 0}
    max_rss = 0
    with tempfile.TemporaryDirectory(prefix="memfuzz-") as tmp:
        data, log_path = Path(tmp) / "data", Path(tmp) / "server.log"
        srv, target = start_target(data, log_path)
        try:
            while time.monotonic() < deadline:
                try:
                    run_examples(target, args.batch, derandomize=False)
                except Crash as exc:
                    totals["crashes"] += 1
                    print(f"CRASH: {exc}", flush=True)
                except Corruption as exc:
                    totals["corruptions"] += 1
                    print(f"CORRUPTION: {exc}", flush=True)
                except Violation as exc:
                    totals["violations"] += 1
                    print(f"VIOLATION: {exc}", flush=True)
                for k in ("cases", "ok", "errors", "no_reply"):
                    totals[k] += target.counts[k]
                max_rss = max(max_rss, target.max_rss)
                # Restart on the same data dir (SIGTERM, or kill -9 every other time) and compare.
                alive = srv.poll() is None
                expected = target.fingerprint() if alive else None
                code = srv.kill() if totals["restarts"] % 2 else srv.stop()
                if alive and code not in (0, -9):
                    totals["crashes"] += 1
                    print(f"CRASH: the server exited with {code} when stopped", flush=True)
                if target.sock is not None:
                    target.sock.close(0)
                srv, target = start_target(data, log_path)
                totals["restarts"] += 1
                target.connect()
                if expected is not None and target.fingerprint() != expected:
                    totals["recovery_mismatches"] += 1
                    print("CORRUPTION: the restarted server holds other data than before the restart", flush=True)
                target.sock.close(0)
                target.sock = None
                print(f"  {totals['cases']} request cases, {totals['restarts']} restarts, max RSS "
                      f"{max_rss >> 20} MiB", flush=True)
        finally:
            srv.kill()
        logging.getLogger("memory_server").setLevel(logging.CRITICAL)  # the history's injected snapshot failure
        rec_counts = RecoveryFuzz(Path(tmp) / "recovery").run_for(60 * args.minutes * args.recovery_share)
    print(f"\nmake fuzz summary ({(time.monotonic() - t0) / 60:.1f} minutes)")
    print(f"  request fuzzer : {totals['cases']} cases ({totals['ok']} ok, {totals['errors']} error replies, "
          f"{totals['no_reply']} over-size frames dropped as documented), {totals['restarts']} restarts")
    print(f"                   crashes {totals['crashes']}, silent corruptions {totals['corruptions']}, recovery "
          f"mismatches {totals['recovery_mismatches']}, protocol violations {totals['violations']}, "
          f"max server RSS {max_rss >> 20} MiB")
    print(f"  recovery fuzzer: {rec_counts['cases']} damaged data dirs ({rec_counts['refused']} refused with exit 4, "
          f"{rec_counts['full']} recovered everything, {rec_counts['torn']} cut at a torn tail as allowed)")
    print(f"                   crashes {rec_counts['crashes']}, wrong data served {rec_counts['wrong']}, "
          f"acknowledged updates lost {rec_counts['lost']}")
    bad = totals["crashes"] + totals["corruptions"] + totals["recovery_mismatches"] + totals["violations"] \
        + rec_counts["crashes"] + rec_counts["wrong"] + rec_counts["lost"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

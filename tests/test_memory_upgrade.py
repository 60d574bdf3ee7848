"""Upgrade of a format-1 data dir (written by the previous release, ad23129) by the real server.

The asset `assets/memserver_format1/` is a data dir that the OLD server left when it was killed with
SIGKILL in the middle of a snapshot (make_asset.py says how it was made), with the export of every
memory and the replies of some requests, taken from that server before the kill. Every check here
compares with those bytes: the upgrade must reproduce them bit for bit, answer retried request ids from
the idempotency window, keep the old files, survive a kill -9 at each of its steps, refuse (exit 4,
naming the file) a damaged old dir or `--no-upgrade`, and never turn damage into a silent wrong state.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memserver_helpers import header_bytes, raw_request, running_server

from memory_server.client import MemoryClient
from memory_server.durability import RecoveryError
from memory_server.launcher import ServerStartError
from memory_server.legacy import LEGACY_DIR, read_format1
from memory_server.store import MemoryStore

pytestmark = pytest.mark.integration

ASSET = Path(__file__).parent / "assets" / "memserver_format1"
EXPECTED = json.loads((ASSET / "expected.json").read_text())
ARRAYS = dict(np.load(ASSET / "expected.npz", allow_pickle=False))
FIELDS = ("keys", "values", "ages", "item_ids")
UPGRADED = "from format 1 to format 2"


def _copy(tmp_path: Path, which: str = "data") -> Path:
    d = tmp_path / "data"
    shutil.copytree(ASSET / which, d)
    return d


def _tree(root: Path, skip: tuple[str, ...] = ("LOCK",)) -> dict[str, str]:
    """relative path -> sha256 of every file under root (LOCK holds the last server's pid)."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def _record_ends(path: Path) -> list[int]:
    """End offsets of the records of a format-1 segment (u32 length, u32 crc, payload), parsed here."""
    data, pos, ends = path.read_bytes(), 0, []
    while pos < len(data):
        pos += 8 + struct.unpack_from("<I", data, pos)[0]
        ends.append(pos)
    assert pos == len(data)
    return ends


def _records(which: str) -> int:
    return sum(len(_record_ends(p)) for p in (ASSET / which).glob("wal-*.log"))


OLD_TREE = _tree(ASSET / "data")

# which asset: (its files, the old snapshot, format-1 records replayed, the new snapshot's number)
ASSETS = {"data": (OLD_TREE, 3, _records("data"), 5),
          "data-clean": (_tree(ASSET / "data-clean"), 5, _records("data-clean"), 6),
          "data-nosnap": (_tree(ASSET / "data-nosnap"), None, _records("data-nosnap"), 2)}


def _expected(which: str) -> tuple[dict, list[dict], str]:
    """(memories, resent requests, key prefix in expected.npz) of an asset."""
    if which == "data-nosnap":
        r = EXPECTED["nosnap"]["resend"]
        return EXPECTED["nosnap"]["memories"], [dict(r, op="update", memory="solo", tag="nosnap/resend")], "nosnap/"
    return EXPECTED["memories"], EXPECTED["resend"], ""


def _check_state(endpoint: str, which: str = "data") -> None:
    """Every memory bit for bit as the old server exported it before it was killed, and no other."""
    memories, _, prefix = _expected(which)
    with MemoryClient(endpoint, timeout_ms=60_000) as c:
        assert c.info()["memories"] == sorted(memories)
        for name, want in memories.items():
            got = c.export(memory=name)
            assert got["version"] == want["version"], name
            for f in FIELDS:
                exp = ARRAYS[f"{prefix}{name}/{f}"]
                assert got[f].dtype == exp.dtype and got[f].tobytes() == exp.tobytes(), f"{name}/{f}"


def _check_window(endpoint: str, which: str = "data") -> None:
    """Retried requests (from the old snapshot's window and from the old WAL) get their first reply."""
    memories, resend, _ = _expected(which)
    with MemoryClient(endpoint, timeout_ms=60_000) as c:
        for r in resend:
            kw = {k: ARRAYS[f"{r['tag']}/{k}"] for k in r["arrays"]} | r["args"]
            reply = getattr(c, r["op"])(**kw, memory=r["memory"], request_id=r["id"])
            assert reply["version"] == r["reply"]["version"], r["id"]
            if r["op"] == "update":
                assert reply["hit"].tolist() == r["reply"]["hit"] and reply["slots"].tolist() == r["reply"]["slots"]
        for name, want in memories.items():
            assert c.export(memory=name)["version"] == want["version"]  # nothing was applied twice
    if which == "data-nosnap":
        return
    # The 300-byte id of a put in the old WAL: format 2 refuses such ids, so its reply was not kept.
    head = header_bytes(v=1, op="export", id=EXPECTED["long_id"], memory="alpha")
    reply = raw_request(endpoint, [head])
    assert reply is not None and reply[0]["ok"] is False and reply[0]["error"]["code"] == "bad_request", reply


def _check_layout(d: Path, which: str = "data") -> None:
    tree, old_snapshot, records, new_seq = ASSETS[which]
    assert (d / "FORMAT").read_text().endswith("format 2\n")
    assert _tree(d / LEGACY_DIR, skip=("UPGRADE.json",)) == tree  # the old files, byte for byte
    record = json.loads((d / LEGACY_DIR / "UPGRADE.json").read_text())
    assert (record["old_snapshot"], record["records"], record["new_seq"]) == (old_snapshot, records, new_seq)
    assert record["window_ids_dropped"] == (which != "data-nosnap")  # the put with a 300-byte id
    assert sorted(p.name for p in d.iterdir()) == ["FORMAT", "LOCK", LEGACY_DIR, f"snap-{new_seq:08d}",
                                                   f"wal-{new_seq:08d}.log"]  # no staging dir left


def _run(d: Path, *flags: str, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """The server as a process that is expected to exit before READY."""
    argv = [sys.executable, "-m", "memory_server", "--bind", "tcp://127.0.0.1:0", "--data-dir", str(d), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("which", sorted(ASSETS))
def test_upgrade_reproduces_every_memory_and_window_then_restarts_as_format2(tmp_path, which):
    d = _copy(tmp_path, which)
    with running_server(d) as srv:
        log = srv.log_tail(20_000)
        assert UPGRADED in log and "version" in log and f"{len(_expected(which)[0])} memories" in log
        _check_state(srv.endpoint, which)
        _check_window(srv.endpoint, which)
        assert srv.stop() == 0
    _check_layout(d, which)
    with running_server(d) as srv:  # already upgraded: a plain format-2 start
        assert UPGRADED not in srv.log_tail(20_000)
        _check_state(srv.endpoint, which)
        name, want = next(iter(_expected(which)[0].items()))
        with MemoryClient(srv.endpoint, timeout_ms=60_000) as c:
            q, v = np.ones((2, want["key_dim"]), np.float32), np.ones((2, want["value_dim"]), np.float32)
            assert c.update(q=q, v=v, threshold=0.1, memory=name)["version"] == want["version"] + 1
        srv.kill()  # the new WAL segment that the upgrade created holds the update
    with running_server(d) as srv:
        with MemoryClient(srv.endpoint, timeout_ms=60_000) as c:
            assert c.export(memory=name)["version"] == want["version"] + 1
        assert srv.stop() == 0
    assert _tree(d / LEGACY_DIR, skip=("UPGRADE.json",)) == ASSETS[which][0]


def test_no_upgrade_refuses_and_changes_nothing(tmp_path):
    d = _copy(tmp_path)
    proc = _run(d, "--no-upgrade")
    assert proc.returncode == 4, proc.stderr
    assert "format-1" in proc.stderr and "Start without --no-upgrade" in proc.stderr
    assert _tree(d) == OLD_TREE and not (d / "FORMAT").exists()
    with running_server(d) as srv:  # and the same dir then upgrades normally
        _check_state(srv.endpoint)


def test_leftovers_of_the_old_servers_last_snapshot_are_kept_not_replayed(tmp_path):
    """Killed between a snapshot's rename and its clean-up, the old server left an older snapshot and
    segment beside the new ones: the newest snapshot wins, and the leftovers go to legacy-format-1 too."""
    d = _copy(tmp_path)
    shutil.copytree(d / "snap-00000003", d / "snap-00000002")
    (d / "wal-00000002.log").write_bytes((d / "wal-00000004.log").read_bytes())  # never read: before snap 3
    old = _tree(d)
    with running_server(d) as srv:
        _check_state(srv.endpoint)
        assert srv.stop() == 0
    assert _tree(d / LEGACY_DIR, skip=("UPGRADE.json",)) == old


def _start_killed(d: Path, n: int) -> bool:
    """Start with a SIGKILL at upgrade step n; True when it was killed there, False when it got READY."""
    try:
        with running_server(d, extra_args=["--fault-upgrade-kill-at", str(n)]) as srv:
            assert srv.stop() == 0
        return False
    except ServerStartError as exc:
        assert "exited with code -9" in str(exc) and f"upgrade step {n} " in str(exc), str(exc)[-3000:]
        return True


def test_upgrade_killed_at_every_step_restarts_to_the_same_state(tmp_path):
    """SIGKILL at step n of the upgrade (n = 1, 2, ... until it completes); then a restart killed at its
    own first step (an interrupted resume); then a plain restart, which must reach the same state."""
    kills = 0
    for n in range(1, 40):
        d = _copy(tmp_path / f"kill{n}")
        if not _start_killed(d, n):  # n is past the last step: the upgrade completed
            _check_layout(d)
            break
        kills += 1
        _start_killed(d, 1)
        with running_server(d) as srv:
            _check_state(srv.endpoint)
            assert srv.stop() == 0
        _check_layout(d)
        logs = "".join(p.read_text() for p in (tmp_path / f"kill{n}").glob("server-*.log"))
        assert UPGRADED in logs  # the one line, from whichever run finished the upgrade
    # staged snapshot, staging complete, committed, legacy dir, 4 old entries, 2 new ones, FORMAT, tidy
    assert kills == 12


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip(path: Path, offset: int, mask: int = 0x10) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


MEM_DIR = "snap-00000003/mem-8ed3f6ad685b959ead70"


def _damage_npy_header(d: Path) -> None:
    path = d / MEM_DIR / "keys.npy"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"'shape': (", b"'shape': (9999999999, ", 1)[:len(data)])


def _nan_in_keys(d: Path) -> None:
    path = d / MEM_DIR / "keys.npy"
    data = bytearray(path.read_bytes())
    data[-4:] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


DAMAGE = {
    "length of the first record": ("wal-00000003.log", lambda d: _flip(d / "wal-00000003.log", 1)),
    "payload of a middle record": ("wal-00000003.log", lambda d: _flip(d / "wal-00000003.log", 300)),
    "length of a record in the last segment": (
        "wal-00000004.log", lambda d: _flip(d / "wal-00000004.log", _record_ends(d / "wal-00000004.log")[0], 0x01)),
    "length of the final record runs past the end": (  # not a torn tail: the record's header disagrees
        "wal-00000004.log", lambda d: _flip(d / "wal-00000004.log", _record_ends(d / "wal-00000004.log")[-2] + 2, 1)),
    "missing segment": ("wal-00000003.log", lambda d: (d / "wal-00000003.log").unlink()),
    "truncated closed segment": (
        "wal-00000003.log", lambda d: _truncate(d / "wal-00000003.log", _record_ends(d / "wal-00000003.log")[2] - 5)),
    "npy header claims a huge shape": ("keys.npy", _damage_npy_header),
    "npy file cut short": ("values.npy", lambda d: _truncate(d / MEM_DIR / "values.npy", 100)),
    "manifest not JSON": ("manifest.json", lambda d: (d / "snap-00000003" / "manifest.json").write_text("{")),
    "NaN in keys": ("keys.npy", _nan_in_keys),
    "legacy dir of an earlier upgrade": (LEGACY_DIR, lambda d: (d / LEGACY_DIR).mkdir()),
}


@pytest.mark.parametrize("what", sorted(DAMAGE))
def test_damaged_format1_dir_refuses_naming_the_file(tmp_path, what):
    name, damage = DAMAGE[what]
    d = _copy(tmp_path)
    damage(d)
    before = _tree(d)
    proc = _run(d)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert name in proc.stderr, proc.stderr[-3000:]
    assert _tree(d) == before and not (d / "FORMAT").exists()  # nothing was changed


def test_torn_tail_of_the_last_segment_is_skipped_not_cut(tmp_path):
    """A record half-written when the old server died was never acknowledged: skipped, old file kept."""
    d = _copy(tmp_path)
    last = d / "wal-00000004.log"
    data = last.read_bytes()
    ends = _record_ends(last)
    torn = data[ends[-2]:ends[-1]][: (ends[-1] - ends[-2]) // 2]  # the first half of a real record
    last.write_bytes(data + torn)
    with running_server(d) as srv:
        assert "torn final record" in srv.log_tail(20_000)
        _check_state(srv.endpoint)
        assert srv.stop() == 0
    assert (d / LEGACY_DIR / "wal-00000004.log").read_bytes() == data + torn


# ---- property: damage to the old log is refused or cut at the damaged record, never served -----------

SEGMENTS = ("wal-00000003.log", "wal-00000004.log")
SIZES = {s: (ASSET / "data" / s).stat().st_size for s in SEGMENTS}
ENDS = _record_ends(ASSET / "data" / SEGMENTS[1])


def _state(d: Path) -> dict[str, tuple[int, bytes]]:
    store = MemoryStore("faiss-cpu")
    store.attach_searchers = False
    read_format1(d, store)
    return {n: (m.version, b"".join(a.tobytes() for _, a in m.export())) for n, m in store.memories.items()}


def _prefix_states() -> list[dict[str, tuple[int, bytes]]]:
    """State after the records of the last segment up to each boundary (0..all)."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(Path(tmp))
        data = (d / SEGMENTS[1]).read_bytes()
        for end in [0, *ENDS]:
            (d / SEGMENTS[1]).write_bytes(data[:end])
            out.append(_state(d))
    return out


PREFIXES = _prefix_states()


def test_full_replay_matches_the_old_export():
    full = PREFIXES[-1]
    assert sorted(full) == sorted(EXPECTED["memories"])
    for name in full:
        assert full[name] == (EXPECTED["memories"][name]["version"],
                              b"".join(ARRAYS[f"{name}/{f}"].tobytes() for f in FIELDS))


@settings(max_examples=120, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(seg=st.sampled_from(SEGMENTS), frac=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255),
       cut=st.booleans())
def test_damaged_log_is_refused_or_cut_at_the_damage(seg, frac, mask, cut):
    """A flipped byte anywhere in the old log, or the last segment cut anywhere (a torn write)."""
    cut = cut and seg == SEGMENTS[1]  # a closed segment cut at a record boundary is undetectable in format 1
    offset = int(frac * SIZES[seg])
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(Path(tmp))
        if cut:
            _truncate(d / seg, offset)
        else:
            _flip(d / seg, offset, mask)
        try:
            got = _state(d)
        except RecoveryError as exc:
            assert seg in str(exc)
            assert not cut, f"a cut last segment is a torn tail, not damage: {exc}"
            return
    assert seg == SEGMENTS[1], "damage in a closed segment must be refused"
    intact = sum(end <= offset for end in ENDS)  # records wholly before the damage
    assert got == PREFIXES[intact], "a state other than a clean cut before the damaged record"
    assert cut or intact == len(ENDS) - 1, "only the final record may be cut as torn"


SNAP_FILES = sorted(p.relative_to(ASSET / "data").as_posix() for p in (ASSET / "data" / "snap-00000003").rglob("*")
                    if p.is_file())


@settings(max_examples=80, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(which=st.sampled_from(SNAP_FILES), frac=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255),
       cut=st.booleans())
def test_damaged_old_snapshot_is_refused_or_read_never_crashes(which, frac, mask, cut):
    """Format 1 has no snapshot checksums: a flipped data byte (an array entry, a character of a window
    id, a digit of a counter) is caught only if it makes a NaN, a negative value or an impossible
    window; but no damage may crash the reader or make it allocate more than the file holds, a cut file
    is always refused, and a refusal names the file."""
    with tempfile.TemporaryDirectory() as tmp:
        d = _copy(Path(tmp))
        path = d / which
        offset = int(frac * path.stat().st_size)
        if cut:
            _truncate(path, offset)
        else:
            _flip(path, offset, mask)
        try:
            _state(d)
        except RecoveryError as exc:
            assert path.name in str(exc) or path.parent.name in str(exc) or "manifest.json" in str(exc), str(exc)
            return
    assert not cut, "a cut snapshot file must be refused (its size is in the manifest)"

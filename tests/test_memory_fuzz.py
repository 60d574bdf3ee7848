"""The fuzzers' short runs (issue 10): a few hundred generated and mutated requests against one real
server process, then a restart on its data dir; random damage to a data dir, then recovery.

The long runs are `make fuzz` (tests/memserver_fuzz.py); their figures are in the README. Both use
derandomized hypothesis here, so the suite sees the same cases on every run.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st
from memserver_fuzz import fuzz_settings, run_examples, start_target
from memserver_recovery_fuzz import KINDS, Damage, RecoveryFuzz

from memory_server.launcher import ServerStartError, start_server

pytestmark = pytest.mark.integration

REQUEST_CASES = int(os.environ.get("MEMSRV_FUZZ_CASES", "400"))
RECOVERY_CASES = int(os.environ.get("MEMSRV_RECOVERY_FUZZ_CASES", "150"))


def test_fuzzed_requests_never_crash_corrupt_or_grow_the_server(tmp_path):
    srv, target = start_target(tmp_path / "data", tmp_path / "server.log")
    try:
        run_examples(target, REQUEST_CASES, derandomize=True)
        assert target.counts["cases"] >= REQUEST_CASES
        assert target.counts["ok"] > REQUEST_CASES // 10 and target.counts["errors"] > REQUEST_CASES // 3
        expected = target.fingerprint()
        assert srv.stop() == 0
        srv, again = start_target(tmp_path / "data", tmp_path / "server.log")
        again.connect()
        assert again.fingerprint() == expected, "the restarted server must hold what the fuzzed one held"
        assert srv.stop() == 0
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def recovery(tmp_path_factory):
    return RecoveryFuzz(tmp_path_factory.mktemp("recovery-fuzz"))


def test_recovery_fuzzer_history_has_every_kind_of_file(recovery):
    names = {p.name for p in recovery.files}
    assert {"FORMAT", "LOCK", "manifest.json", "data.bin"} <= names and recovery.total == 15
    assert len([n for n in names if n.startswith("wal-")]) == 2


@fuzz_settings(RECOVERY_CASES, derandomize=True)
@given(file=st.integers(0, 100), kind=st.sampled_from(KINDS), at=st.floats(0, 1), length=st.floats(0, 1),
       bit=st.integers(0, 7))
def test_damaged_data_dir_recovers_exactly_or_refuses(recovery, file, kind, at, length, bit):
    recovery.check(Damage(file, kind, at, length, bit))


def test_recovery_fuzzer_sees_each_outcome(recovery):
    # Deterministic damages with a known outcome, so the oracle itself is tested.
    last = recovery.files.index(recovery.last_segment)
    assert recovery.check(Damage(last, "truncate", 0.999)) == "torn"
    assert recovery.check(Damage(last, "flip", 0.5, bit=3)) == "refused"
    assert recovery.check(Damage(recovery.files.index(next(p for p in recovery.files if p.name == "LOCK")), "delete_file",
                                 0.0)) == "full"


def test_damaged_snapshot_refuses_real_server_with_exit_4(recovery, tmp_path):
    target = tmp_path / "data"
    import shutil  # noqa: PLC0415

    shutil.copytree(recovery.base, target)
    data = next(target.glob("snap-*/data.bin"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0x20
    data.write_bytes(bytes(raw))
    log = tmp_path / "server.log"
    with pytest.raises(ServerStartError, match="exited with code 4"):
        start_server(target, log_path=log)
    assert "data.bin" in log.read_text() and "checksum" in log.read_text()


def test_crash_campaign_smoke(tmp_path):
    # One round per durability mode of `make crash-test` (which runs 240), so the campaign stays working.
    from memserver_crash_campaign import campaign  # noqa: PLC0415

    for i, mode in enumerate(("always", "batch")):
        t = campaign(mode, 1, seed=i, workdir=tmp_path, log=lambda *_: None)
        assert t.kills == 1 and t.acked >= 1, t
        assert (t.lost, t.corruptions, t.failed_restarts, t.idempotency_lost) == (0, 0, 0, 0), t.notes

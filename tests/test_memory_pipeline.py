"""Phase 1 with the memory off the critical path: MemoryClient's update_async / query_async and the
trainer's pipelined updates (memory.pipeline), against a real memory server process on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq
from accelerate import Accelerator
from memserver_helpers import running_server

from memory_server.client import BadShape, MemoryClient, MemoryUnavailable
from pccnet.color import NUM_BINS
from pccnet.config import ExtractorConfig
from pccnet.extractor import MemoryExtractor
from trainer.config import LossConfig, MemoryConfig, Phase1Config
from trainer.memory import TrainerMemory
from trainer.step import StepContext, memory_step

pytestmark = pytest.mark.integration

SIZE, B, DIM, CAPACITY = 16, 4, 8, 12


def unit_rows(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, dim)).astype(np.float32)
    v = rng.random((n, NUM_BINS)).astype(np.float32) + 0.01
    return q / np.linalg.norm(q, axis=1, keepdims=True), v / v.sum(1, keepdims=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(None, durability="none") as proc:
        yield proc


def test_async_update_is_seen_by_the_next_query(server):
    with MemoryClient(server.endpoint, memory="async") as client:
        client.create(capacity=4, key_dim=DIM, value_dim=NUM_BINS, seed=0)
        q, v = unit_rows(2, DIM, 1)
        pending = client.update_async(q, v, threshold=0.0, item_ids=np.array([7, 8]))
        assert not pending.collected
        # Sent after the update without collecting it first: the query still sees both rows written.
        reply = client.query_async(q, k=1, fields=("item_ids",)).result()
        assert reply["item_ids"][:, 0].tolist() == [7, 8]
        assert reply["sims"][:, 0] == pytest.approx([1.0, 1.0], abs=1e-5)
        upd = pending.result()  # already collected by the query; the same reply on every call
        assert upd["hit"].tolist() == [False, False] and upd is pending.result()
        assert reply["version"] == upd["version"] == 1


def test_an_in_flight_error_surfaces_on_the_next_call(server):
    with MemoryClient(server.endpoint, memory="async-err") as client:
        client.create(capacity=4, key_dim=DIM, value_dim=NUM_BINS)
        q, v = unit_rows(2, DIM + 1, 2)  # the wrong key width
        pending = client.update_async(q, v, threshold=0.0)
        with pytest.raises(BadShape):
            client.info()  # the next call raises the update's error, before it sends anything
        with pytest.raises(BadShape):
            pending.result()
        assert client.info(memory="async-err")["filled"] == 0  # and the client goes on working


def test_an_unanswered_update_fails_within_its_deadline():
    """A peer that accepts requests and never answers: the pending update raises MemoryUnavailable
    (after its retries), on result() and not later than the next call."""
    ctx = zmq.Context()
    sink = ctx.socket(zmq.ROUTER)
    sink.setsockopt(zmq.LINGER, 0)
    port = sink.bind_to_random_port("tcp://127.0.0.1")
    try:
        client = MemoryClient(f"tcp://127.0.0.1:{port}", timeout_ms=150, retries=1)
        q, v = unit_rows(1, DIM, 3)
        client.update_async(q, v, threshold=0.0)
        assert sink.poll(20_000)  # the request left without waiting for anything
        with pytest.raises(MemoryUnavailable, match="'update'.*2 attempt"):
            client.ping()  # the next call first collects the update, which has run out of attempts
        client.close()
    finally:
        sink.close(0)
        ctx.term()


def _phase1(tmp_path, pipeline: bool, update_query: str = "post_step", steps: int = 5, key_cache: bool = False,
            between=None, address: str | None = None, local_queries: bool = True) -> tuple[dict, dict]:
    """`steps` real memory_steps of a tiny extractor against an embedded server; the export and hits.
    `between(step, memory)` runs after each step."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    extractor = MemoryExtractor(ExtractorConfig(backbone="resnet18-scratch", dim=DIM, resnet_width=1))
    opt = torch.optim.Adam(extractor.parameters(), lr=1e-2)
    cfg = MemoryConfig(address=address, capacity=CAPACITY, durability="none", pipeline=pipeline, key_cache=key_cache,
                       local_queries=local_queries)
    memory = TrainerMemory(cfg, tmp_path / f"{pipeline}-{key_cache}-{local_queries}-{update_query}", rank=0)
    ctx = StepContext(accelerator=acc, loss=LossConfig(), use_memory=True, world_size=1, seed=3,
                      phase1=Phase1Config(k=4, threshold=0.8, age_noise=2.0, update_query=update_query))
    try:
        memory.ensure(CAPACITY, DIM, NUM_BINS, seed=5)
        hit_rates = []
        g = torch.Generator().manual_seed(11)
        for step in range(steps):
            batch = {"light": torch.rand(B, 1, SIZE, SIZE, generator=g) * 2 - 1,
                     "color_feature": torch.softmax(3 * torch.randn(B, NUM_BINS, generator=g), 1),
                     "item_id": torch.arange(step * B, (step + 1) * B)}
            scalars, _ = memory_step(ctx, extractor, opt, batch, memory, step)
            hit_rates.append(scalars.get("mem/hit_rate"))
            if between is not None:
                between(step, memory)
        last = memory.take_update()
        mirror = None if memory.mirror is None else memory.mirror.keys.copy()
        replica = memory.mirror is not None and memory.mirror.replica is not None
        weights = torch.cat([p.detach().flatten() for p in extractor.parameters()]).numpy()
        return memory.export(), {"rates": hit_rates, "last": last, "written": dict(memory.written),
                                 "mirror": mirror, "replica": replica, "weights": weights,
                                 "queries": memory.calls["query"]}
    finally:
        memory.close()


@pytest.mark.parametrize("update_query", ["post_step", "pre_step"])
def test_pipelining_leaves_the_memory_bit_for_bit_the_same(tmp_path, update_query):
    off, off_hits = _phase1(tmp_path, pipeline=False, update_query=update_query)
    on, on_hits = _phase1(tmp_path, pipeline=True, update_query=update_query)
    assert off["version"] == on["version"] == 5
    for name in ("keys", "values", "ages", "item_ids"):
        assert off[name].tobytes() == on[name].tobytes(), name
    assert 0 < int((on["item_ids"] >= 0).sum()) <= CAPACITY
    # The pipelined run reports each update's hit rate one step late; the last comes from take_update().
    assert on_hits["rates"][0] is None and off_hits["last"] is None
    assert on_hits["rates"][1:] == off_hits["rates"][:-1]
    assert float(np.mean(on_hits["last"]["hit"])) == off_hits["rates"][-1]
    assert on_hits["written"] == off_hits["written"] and sum(on_hits["written"].values()) == 5 * B


@pytest.mark.parametrize(("address", "local_queries"), [(None, False), (None, True), ("inproc", True)],
                         ids=["server-keys", "server-replica", "inproc"])
def test_the_key_mirror_trains_bit_for_bit_like_keys_in_the_reply(tmp_path, address, local_queries):
    """Keys from the mirror, or whole queries answered by the replica, train exactly as the server's
    replies do: the same weights, hit rates and memory, bit for bit."""
    off, off_run = _phase1(tmp_path, pipeline=True, steps=6, key_cache=False, address=address)
    on, on_run = _phase1(tmp_path, pipeline=True, steps=6, key_cache=True, address=address,
                         local_queries=local_queries)
    assert off_run["mirror"] is None and on_run["mirror"] is not None  # the mirror was used to the end
    assert on_run["replica"] is (address is None and local_queries)  # never for an in-process memory
    assert on_run["mirror"].tobytes() == on["keys"].tobytes()  # and equals the server's keys exactly
    assert on_run["weights"].tobytes() == off_run["weights"].tobytes()
    for name in ("keys", "values", "ages", "item_ids"):
        assert off[name].tobytes() == on[name].tobytes(), name
    assert on_run["rates"] == off_run["rates"] and on_run["queries"] == off_run["queries"] == 6


@pytest.mark.parametrize("pipeline", [True, False])
def test_the_replica_trains_bit_for_bit_with_pre_step_updates(tmp_path, pipeline):
    """pre_step sends the update before the backward: the replica still answers each query as the server."""
    off, off_run = _phase1(tmp_path, pipeline=pipeline, update_query="pre_step", key_cache=False)
    on, on_run = _phase1(tmp_path, pipeline=pipeline, update_query="pre_step", key_cache=True)
    assert on_run["replica"] and on_run["weights"].tobytes() == off_run["weights"].tobytes()
    for name in ("keys", "values", "ages", "item_ids"):
        assert off[name].tobytes() == on[name].tobytes(), name


def test_a_second_writer_drops_the_key_mirror_and_training_goes_on(tmp_path, caplog):
    def other_client_writes(step, memory):
        if step == 2:
            q, v = unit_rows(1, DIM, 9)
            with MemoryClient(memory.endpoint) as other:
                other.update(q, v, threshold=0.0, seed=1)

    with caplog.at_level("WARNING", logger="trainer.memory"):
        on, on_run = _phase1(tmp_path, pipeline=True, key_cache=True, between=other_client_writes,
                             local_queries=False)
    off, off_run = _phase1(tmp_path, pipeline=True, key_cache=False, between=other_client_writes)
    assert on_run["mirror"] is None and "memory.key_cache dropped" in caplog.text
    assert "the mirror at" in caplog.text
    assert on_run["weights"].tobytes() == off_run["weights"].tobytes()  # the stale copy was never used
    assert on["version"] == off["version"] == 6 and on["keys"].tobytes() == off["keys"].tobytes()


def test_a_second_writer_drops_the_replica_at_the_next_update(tmp_path, caplog):
    """A replica learns of a foreign write from its next update reply (the version skips one): it is
    dropped there and the run asks the server from then on. The query between the two may have been
    answered as of this rank's last update (docs/PERFORMANCE.md): a serialisation the server allows."""
    def other_client_writes(step, memory):
        if step == 2:
            assert memory.mirror.replica is not None
            q, v = unit_rows(1, DIM, 9)
            with MemoryClient(memory.endpoint) as other:
                other.update(q, v, threshold=0.0, seed=1)

    with caplog.at_level("WARNING", logger="trainer.memory"):
        on, on_run = _phase1(tmp_path, pipeline=True, key_cache=True, between=other_client_writes)
    assert on_run["mirror"] is None and not on_run["replica"]
    assert "memory.key_cache dropped (update reply at version 5, the mirror at 3)" in caplog.text
    assert on["version"] == 6 and on_run["queries"] == 5


def test_a_replica_caught_wrong_at_its_checked_query_is_never_used(tmp_path, caplog):
    """A replica gone wrong (here: one value changed behind its back) is caught by the next checked query,
    whose answer then comes from the server: training is still the same bit for bit."""
    from trainer.keymirror import VERIFY_EVERY

    def corrupt(step, memory):
        if step == 1:
            mem = memory.mirror.replica.mem
            mem.negent[:] += 0.5  # every slot's KL moves: any answer with targets differs
            memory.mirror.queries = VERIFY_EVERY  # the next query is a checked one

    with caplog.at_level("WARNING", logger="trainer.memory"):
        on, on_run = _phase1(tmp_path, pipeline=True, key_cache=True, between=corrupt)
    off, off_run = _phase1(tmp_path, pipeline=True, key_cache=False)
    assert "query answer differs from the server's (kl)" in caplog.text and not on_run["replica"]
    assert on_run["weights"].tobytes() == off_run["weights"].tobytes()
    assert on_run["queries"] == off_run["queries"] == 5  # the failed local answer is not counted
    for name in ("keys", "values", "ages", "item_ids"):
        assert off[name].tobytes() == on[name].tobytes(), name


def test_the_replica_spot_checks_find_a_wrong_answer_and_a_wrong_value(server):
    from memory_server.replica import Replica
    from trainer.keymirror import VERIFY_EVERY, KeyMirror, MirrorStale

    with MemoryClient(server.endpoint, memory="replica") as client:
        client.create(capacity=CAPACITY, key_dim=DIM, value_dim=NUM_BINS, seed=4)
        mirror = KeyMirror(client, CAPACITY, torch.device("cpu"), seed=0, replica=Replica(client))
        q, v = unit_rows(B, DIM, 5)
        mirror.apply_update(q, client.update(q, v, threshold=0.5, seed=2, item_ids=np.arange(B)), v, np.arange(B))
        first = mirror.query(q, k=3, targets=v)  # the first answer is checked against the server's
        assert first["version"] == 1 and mirror.keys is mirror.replica.mem.keys
        mirror.verify()
        slot = int(first["slots"][0, 0])
        mirror.replica.mem.values[slot, :2] = mirror.replica.mem.values[slot, 1::-1] + np.float32(1e-3)
        mirror.replica.mem.negent[slot] += 1e-3  # what a wrong value would do to KL
        assert mirror.query(q, k=3, targets=v)["kl"].tobytes() != first["kl"].tobytes()  # not checked...
        mirror.queries = VERIFY_EVERY  # ...until the VERIFY_EVERY-th query after the first
        with pytest.raises(MirrorStale, match=r"query answer differs from the server's \(kl\)"):
            mirror.query(q, k=3, targets=v)
        with pytest.raises(MirrorStale, match=f"slot {slot}'s values differ"):
            mirror.verify()  # a sample of 64 slots: with capacity 12, every one is compared


def test_the_key_mirror_spot_check_finds_a_wrong_key(server):
    from trainer.keymirror import KeyMirror, MirrorStale

    with MemoryClient(server.endpoint, memory="mirror") as client:
        client.create(capacity=CAPACITY, key_dim=DIM, value_dim=NUM_BINS, seed=4)
        mirror = KeyMirror(client, CAPACITY, torch.device("cpu"), seed=0)
        q, v = unit_rows(B, DIM, 5)
        mirror.apply_update(q, client.update(q, v, threshold=0.5, seed=2))
        mirror.verify()  # equal after a replayed update
        assert mirror.keys.tobytes() == client.export()["keys"].tobytes()
        mirror.keys[3, 0] = np.nextafter(mirror.keys[3, 0], np.float32(2))  # one ulp off
        with pytest.raises(MirrorStale, match="slot 3's key differs"):
            mirror.verify()
        with pytest.raises(MirrorStale, match="version 3"):
            mirror.apply_update(q, {"version": 3, "hit": np.zeros(B, bool), "slots": np.arange(B)})

"""memory_server.replica: a writer's read-only copy of a server memory, against real server processes."""

from __future__ import annotations

import numpy as np
import pytest
from memserver_helpers import running_server

from memory_server.client import MemoryClient, rows_per_get
from memory_server.replica import Replica, ReplicaUnavailable, replica_nbytes
from memory_server.store import arrays_nbytes

pytestmark = pytest.mark.integration

DK, DV, M = 16, 313, 40


def batch(rng: np.random.Generator, n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    q = rng.standard_normal((n, DK)).astype(np.float32)
    v = (rng.random((n, DV)) ** 6).astype(np.float32)  # peaked, so some rows fall under the threshold
    return q, v


def assert_same_memory(client: MemoryClient, replica: Replica) -> None:
    a, b = client.export(), replica.export()
    assert a["version"] == b["version"] == replica.version
    for name in ("keys", "values", "ages", "item_ids"):
        assert a[name].tobytes() == b[name].tobytes(), name


def follow(client: MemoryClient, replica: Replica, rng: np.random.Generator, steps: int, k: int = 12) -> int:
    """`steps` updates through the server, each replayed into the replica, with the two answering the same
    query after each; the number of hit rows."""
    hits = 0
    for i in range(steps):
        q, v = batch(rng)
        if i % 2:
            q[1] = q[0]  # two rows on one slot: the hit merge adds both, in row order
            q[2] = -q[3]
        ids = np.arange(6, dtype=np.int64) + 100 * i if i % 3 else None
        reply = client.update(q, v, threshold=3.45, age_noise=1.5, seed=i, item_ids=ids)
        replica.follow_update(q, v, ids, reply)
        hits += int(reply["hit"].sum())
        probe, targets = batch(rng, 4)
        mine, theirs = replica.query(probe, k=k, targets=targets), client.query(probe, k=k, targets=targets)
        assert mine["version"] == theirs["version"]
        for name in ("slots", "sims", "kl"):
            assert mine[name].tobytes() == theirs[name].tobytes(), (i, name)
    return hits


@pytest.mark.parametrize("extra", [[], ["--value-dtype", "float16"], ["--backend", "torch"]],
                         ids=["faiss", "float16-values", "torch-cpu"])
def test_a_replica_answers_and_holds_exactly_what_the_server_does(extra):
    rng = np.random.default_rng(0)
    with running_server(None, durability="none", extra_args=extra) as srv, MemoryClient(srv.endpoint, memory="r") as client:
        client.create(capacity=M, key_dim=DK, value_dim=DV, seed=3)
        for i in range(4):  # a memory with history before the replica is made
            q, v = batch(rng)
            client.update(q, v, threshold=3.45, age_noise=1.0, seed=50 + i)
        replica = Replica(client)
        assert replica.version == 4 and replica.mem.values.dtype == np.dtype(client.info()["value_dtype"])
        hits = follow(client, replica, rng, steps=30)
        assert 0 < hits < 30 * 6  # both kinds of row were replayed
        assert_same_memory(client, replica)


def test_a_write_the_replica_did_not_see_is_refused_by_version():
    rng = np.random.default_rng(1)
    with running_server(None, durability="none") as srv, MemoryClient(srv.endpoint, memory="w") as client:
        client.create(capacity=M, key_dim=DK, value_dim=DV, seed=3)
        replica = Replica(client)
        q, v = batch(rng)
        client.update(q, v, threshold=1.0, seed=1)  # another writer
        reply = client.update(q, v, threshold=1.0, seed=2)
        with pytest.raises(ReplicaUnavailable, match="version 2, the replica at 0"):
            replica.follow_update(q, v, None, reply)
        assert replica.version == 0 and int(replica.mem.ages.max()) == 0  # nothing applied


def test_only_an_exact_index_on_this_backend_is_replicated():
    with running_server(None, durability="none", extra_args=["--index", "approximate"]) as srv, \
            MemoryClient(srv.endpoint, memory="ivf") as client:
        client.create(capacity=M, key_dim=DK, value_dim=DV, seed=3)
        with pytest.raises(ReplicaUnavailable, match="index is 'approximate'"):
            Replica(client)
    info = {"capacity": 10, "key_dim": 4, "value_dim": 3, "backend": "faiss-gpu", "index": "exact",
            "key_dtype": "float32", "value_dtype": "float32", "max_message_bytes": 1 << 20, "max_batch": 64}
    with pytest.raises(ReplicaUnavailable, match="faiss-gpu"):
        Replica(client, info=info)  # this machine has no GPU: its search would not be the server's
    with pytest.raises(ReplicaUnavailable, match="'hnsw' is not one"):
        Replica(client, info={**info, "backend": "hnsw"})
    assert replica_nbytes({**info, "value_dtype": "float16"}) == arrays_nbytes(10, 4, 3, "float16")


def test_the_first_reads_respect_the_servers_limits():
    """A server with a small --max-batch: the replica (by `export`) and the key mirror (by `get`s of chunks it
    accepts) read it whole."""
    import torch

    from trainer.keymirror import KeyMirror

    rng = np.random.default_rng(2)
    with running_server(None, durability="none", extra_args=["--max-batch", "7"]) as srv, \
            MemoryClient(srv.endpoint, memory="small") as client:
        client.create(capacity=M, key_dim=DK, value_dim=DV, seed=3)
        q, v = batch(rng)
        client.update(q, v, threshold=3.45, seed=1)
        info = client.info()
        assert rows_per_get(info) == 7
        assert rows_per_get({**info, "max_message_bytes": 4096 + 3 * (4 * DK + 4 * DV + 12)}) == 3
        replica = Replica(client)
        assert_same_memory(client, replica)
        mirror = KeyMirror(client, M, torch.device("cpu"), rows_per_get=rows_per_get(info))
        assert mirror.keys.tobytes() == client.export()["keys"].tobytes() and mirror.version == 1

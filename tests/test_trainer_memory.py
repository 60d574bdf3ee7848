"""trainer.memory: the memory the loop uses, in-process (memory.address: inproc) and as the embedded server
process rank 0 starts (memory.address: null); what it counts, restores and retrieves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from trainhelpers import FixedQuery

from memory_server.client import MemoryClient
from pccnet.color import NUM_BINS
from trainer.config import MemoryConfig
from trainer.memory import TrainerMemory


def rows(n: int, dim: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    v = rng.random((n, NUM_BINS)).astype(np.float32) + 0.01
    return q, v / v.sum(1, keepdims=True)


def test_inproc_counts_training_traffic_only(tmp_path):
    memory = TrainerMemory(MemoryConfig(address="inproc", capacity=8), tmp_path, rank=0)
    try:
        info = memory.ensure(8, 4, NUM_BINS, seed=0)
        assert memory.endpoint == "inproc" and info["capacity"] == 8 and info["filled"] == 0
        q, v = rows(3)
        upd = memory.update(q, v, threshold=0.0, age_noise=0.0, seed=0, item_ids=np.array([10, 11, 12]))
        assert upd["hit"].tolist() == [False, False, False]
        reply = memory.query(q, k=2, targets=v, fields=("keys",))
        assert reply["keys"].shape == (3, 2, 4) and reply["kl"].shape == (3, 2)
        c, slots = memory.retrieve(FixedQuery(q), torch.zeros(3, 1, 8, 8))
        # Each query's own row is its best written slot and returns its own value.
        np.testing.assert_allclose(c.numpy(), v, atol=1e-6)
        assert sorted(slots.tolist()) == sorted(upd["slots"].tolist())
        assert memory.calls == {"query": 1, "update": 1}  # retrieval is not training traffic
    finally:
        memory.close()


def test_restore_overwrites_every_slot_with_an_export(tmp_path):
    first = TrainerMemory(MemoryConfig(address="inproc", capacity=6), tmp_path, rank=0)
    second = TrainerMemory(MemoryConfig(address="inproc", capacity=6), tmp_path, rank=0)
    try:
        first.ensure(6, 4, NUM_BINS, seed=0)
        second.ensure(6, 4, NUM_BINS, seed=1)
        first.update(*rows(4), threshold=0.0, age_noise=0.0, seed=0, item_ids=np.arange(4))
        saved = first.export()
        second.update(*rows(2, seed=5), threshold=0.0, age_noise=0.0, seed=0, item_ids=np.array([90, 91]))
        assert second.restore(saved) == 2  # its one update, then one put of all 6 rows
        now = second.export()
        np.testing.assert_allclose(now["keys"], saved["keys"], atol=1e-6)
        np.testing.assert_array_equal(now["item_ids"], saved["item_ids"])
        np.testing.assert_array_equal(now["ages"], saved["ages"])
    finally:
        first.close()
        second.close()


def test_inproc_serves_one_process_only(tmp_path):
    with pytest.raises(ValueError, match="'inproc' serves one process only"):
        TrainerMemory(MemoryConfig(address="inproc"), tmp_path, rank=0, broadcast_object=lambda o: o)


@pytest.mark.integration
def test_embedded_server_lives_in_out_dir_and_stops_cleanly(tmp_path):
    memory = TrainerMemory(MemoryConfig(address=None, capacity=8, durability="none"), tmp_path, rank=0,
                           broadcast_object=lambda endpoint: endpoint)  # what rank 0 shares with the others
    server = memory.server
    try:
        assert memory.endpoint.startswith("tcp://127.0.0.1:") and (tmp_path / "memory-server").is_dir()
        memory.ensure(8, 4, NUM_BINS, seed=0)
        # Another rank's view: a client of the endpoint rank 0 broadcast, on the one shared memory.
        with MemoryClient(memory.endpoint) as other:
            other.update(*rows(2), threshold=0.0)
        assert memory.info()["filled"] == 2
    finally:
        memory.close()
    assert memory.server is None and server.poll() == 0  # SIGTERM: snapshot, exit 0
    assert (tmp_path / "memory-server.log").is_file()

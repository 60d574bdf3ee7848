"""In-process tests of the store and engine: the update rule against the numpy reference, put/get,
create from a seed, idempotency, and the torch backend agreeing with faiss."""

from __future__ import annotations

import numpy as np
import pytest
from memserver_helpers import UpdateStream, assert_same_state, initial_state, reference_update, unit

from memory_server.local import InProcessMemory
from memory_server.protocol import BadValue, NoSuchMemory, TooLarge


def _mem(backend="faiss", m=64, dk=16, dv=8, seed=5):
    return InProcessMemory(capacity=m, key_dim=dk, value_dim=dv, seed=seed, backend=backend)


def test_create_matches_protocol_initial_state():
    mem = _mem(seed=11)
    ex = mem.export()
    assert_same_state(ex, initial_state(64, 16, 8, 11))
    assert ex["version"] == 0
    assert mem.info()["filled"] == 0
    assert mem.create(64, 16, 8)["version"] == 0  # idempotent for the same shape


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_update_rule_matches_numpy_reference_without_noise(seed):
    rng = np.random.default_rng(seed)
    mem = _mem(seed=seed)
    state = initial_state(64, 16, 8, seed)
    stream = UpdateStream(16, 8, seed=seed, pool=20, batch=int(rng.integers(3, 17)))
    hits = misses = 0
    for step in range(25):
        kw = stream.next()
        kw.update(age_noise=0.0, seed=None, threshold=float(rng.choice([0.0, 0.2, 0.6, 3.0])))
        if step % 5 == 0:
            kw["q"] = np.concatenate([kw["q"], kw["q"][:2]])  # exact duplicate rows in one batch
            kw["v"] = np.concatenate([kw["v"], kw["v"][:2]])
            kw["item_ids"] = np.concatenate([kw["item_ids"], kw["item_ids"][:2]])
        got = mem.update(**kw)
        state, hit, slots = reference_update(state, kw["q"], kw["v"], kw["threshold"], item_ids=kw["item_ids"])
        np.testing.assert_array_equal(got["hit"], hit, err_msg=f"step {step}")
        np.testing.assert_array_equal(got["slots"], slots, err_msg=f"step {step}")
        assert got["version"] == step + 1
        hits, misses = hits + int(hit.sum()), misses + int((~hit).sum())
    assert hits > 10 and misses > 10, "the sequence must exercise both branches"
    assert_same_state(mem.export(), state, exact=False)
    stats = mem.stats()
    assert (stats["hits"], stats["misses"]) == (hits, misses)


def test_update_rule_with_noise_matches_reference_given_seed():
    mem = _mem(seed=9)
    state = initial_state(64, 16, 8, 9)
    stream = UpdateStream(16, 8, seed=9)
    for _ in range(15):
        kw = stream.next()
        got = mem.update(**kw)
        state, hit, slots = reference_update(state, kw["q"], kw["v"], kw["threshold"], kw["age_noise"], kw["seed"],
                                             kw["item_ids"])
        np.testing.assert_array_equal(got["slots"], slots)
    assert_same_state(mem.export(), state, exact=False)


def test_noisy_replacement_prefers_old_slots_statistically():
    m, n_miss, noise = 200, 20, 10.0
    chosen_ages = []
    for seed in range(40):
        mem = _mem(m=m, seed=1)
        mem.put(np.arange(m), np.random.default_rng(0).standard_normal((m, 16)), np.ones((m, 8)),
                ages=np.arange(m, dtype=np.float32))
        q = np.random.default_rng(seed).standard_normal((n_miss, 16)).astype(np.float32)
        out = mem.update(q, np.ones((n_miss, 8)), threshold=0.0, age_noise=noise, seed=seed)
        assert not out["hit"].any()
        chosen_ages.append(out["slots"].astype(float))  # slot index == age before the update
    ages = np.concatenate(chosen_ages)
    # Without noise the choice is ages 180..199; noise +-10 lets ages down to ~160 compete.
    assert ages.min() >= m - n_miss - 2 * noise - 1
    assert ages.mean() > 175
    assert (ages < m - n_miss).any(), "noise must sometimes pick a slot outside the strict oldest"


def test_update_ages_every_slot_and_resets_written():
    mem = _mem(m=10, dk=4, dv=3)
    out = mem.update(np.eye(4, dtype=np.float32)[:2], np.ones((2, 3)), threshold=0.0)
    ages = mem.export()["ages"]
    assert (ages[out["slots"]] == 0).all()
    others = np.setdiff1d(np.arange(10), out["slots"])
    assert (ages[others] == 1).all()
    np.testing.assert_array_equal(out["slots"], [0, 1])  # all ages tie: lowest slots first
    assert mem.info()["filled"] == 2


def test_put_get_normalise_and_count_filled():
    mem = _mem(m=16, dk=4, dv=3)
    r = mem.put([3, 5], [[3, 0, 0, 4], [0, 2, 0, 0]], [[1, 1, 2], [0, 0, 5]], ages=[7, 0], item_ids=[10, 11])
    assert r["version"] == 1
    g = mem.get(np.array([5, 3, 3]))
    np.testing.assert_allclose(g["keys"][1], [0.6, 0, 0, 0.8], atol=1e-7)
    np.testing.assert_allclose(g["values"][0], [0, 0, 1])
    np.testing.assert_array_equal(g["ages"], [0, 7, 7])
    np.testing.assert_array_equal(g["item_ids"], [11, 10, 10])
    assert mem.put([3], [[1, 0, 0, 0]], [[1, 1, 1]])["version"] == 2
    assert mem.info()["filled"] == 2
    assert mem.get([3])["item_ids"][0] == -1


def test_query_fields_and_kl_against_reference():
    mem = _mem(m=32, dk=8, dv=5)
    rng = np.random.default_rng(2)
    vals = rng.random((32, 5)) * (rng.random((32, 5)) < 0.7) + 1e-3 * (np.arange(5) == 0)
    mem.put(np.arange(32), rng.standard_normal((32, 8)), vals)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    t = rng.random((4, 5)).astype(np.float32)
    r = mem.query(q, 6, targets=t, fields=["values", "keys", "ages", "item_ids"])
    ex = mem.export()
    sims_ref = unit(q).astype(np.float64) @ ex["keys"].astype(np.float64).T
    for b in range(4):
        order = np.lexsort((np.arange(32), -sims_ref[b]))[:6]
        np.testing.assert_array_equal(r["slots"][b], order)
        np.testing.assert_allclose(r["sims"][b], sims_ref[b][order], atol=1e-6)
        from memserver_helpers import reference_kl
        np.testing.assert_allclose(r["kl"][b], [reference_kl(ex["values"][s], t[b]) for s in order], rtol=1e-5)
    np.testing.assert_array_equal(r["values"], ex["values"][r["slots"]])
    assert r["keys"].shape == (4, 6, 8) and r["ages"].shape == (4, 6) and r["item_ids"].dtype == np.int64


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_kl_matrix_is_the_float64_definition_bit_for_bit(value_dtype):
    """kl_matrix lets einsum cast the held values as it goes: the same bits as casting them first."""
    from memory_server.store import Memory

    rng = np.random.default_rng(4)
    for m, dv, rows, k in [(300, 313, 8, 256), (17, 5, 3, 17), (900, 64, 33, 40)]:
        values = (rng.random((m, dv)) ** 4 + 1e-6).astype(value_dtype)
        values /= values.sum(1, keepdims=True)
        mem = Memory("kl", np.zeros((m, 4), np.float32), values, np.zeros(m, np.float32), np.full(m, -1, np.int64),
                     np.zeros(m, bool))
        slots = rng.integers(0, m, (rows, k))
        log_v = np.log(rng.random((rows, dv)) ** 3 + 1e-8)
        want = np.maximum(0.0, mem.negent[slots] - np.einsum("rkd,rd->rk", values[slots].astype(np.float64), log_v))
        assert mem.kl_matrix(slots, log_v).tobytes() == want.astype(np.float32).tobytes()


def test_float16_inputs_accepted():
    mem = _mem(m=16, dk=4, dv=3)
    r = mem.query(np.ones((2, 4), np.float16), 2)
    assert r["slots"].shape == (2, 2)
    u = mem.update(np.eye(4, dtype=np.float16)[:2], np.ones((2, 3), np.float16), threshold=0.1)
    assert u["version"] == 1


def test_idempotent_update_and_put_in_process():
    mem = _mem(m=16, dk=4, dv=3)
    q, v = np.eye(4, dtype=np.float32)[:3], np.ones((3, 3))
    first = mem.update(q, v, threshold=0.0, request_id="req-1")
    before = mem.export()
    again = mem.update(-q, v * 2, threshold=5.0, request_id="req-1")  # different payload, same id
    np.testing.assert_array_equal(again["slots"], first["slots"])
    np.testing.assert_array_equal(again["hit"], first["hit"])
    assert again["version"] == first["version"] == 1
    assert_same_state(mem.export(), before)
    assert mem.put([0], [[1, 0, 0, 0]], [[1, 1, 1]], request_id=1)["version"] == 2
    assert mem.put([0], [[0, 1, 0, 0]], [[1, 1, 1]], request_id=1)["version"] == 2
    assert mem.put([0], [[0, 1, 0, 0]], [[1, 1, 1]], request_id="1")["version"] == 3  # "1" != 1
    with pytest.raises(BadValue):
        mem.update(q, -v, threshold=0.0, request_id="req-2")
    assert mem.update(q, v, threshold=0.0, request_id="req-2")["version"] == 4  # rejected ids are not remembered


def test_errors_in_process():
    mem = _mem(m=4, dk=4, dv=3)
    with pytest.raises(TooLarge):
        mem.update(np.ones((5, 4)), np.ones((5, 3)), threshold=0.0)
    with pytest.raises(NoSuchMemory):
        mem.query(np.ones((1, 4)), 1, memory="other")
    with pytest.raises(BadValue):
        mem.get([4])


def test_torch_backend_agrees_with_faiss():
    a, b = _mem("faiss", seed=4), _mem("torch", seed=4)
    stream_a, stream_b = UpdateStream(16, 8, seed=4), UpdateStream(16, 8, seed=4)
    for _ in range(10):
        ra, rb = a.update(**stream_a.next()), b.update(**stream_b.next())
        np.testing.assert_array_equal(ra["slots"], rb["slots"])
    assert b.info()["backend"] in ("torch-cpu", "torch-cuda")
    q = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(a.query(q, 20)["slots"], b.query(q, 20)["slots"])
    assert_same_state(a.export(), b.export())

"""trainer.retrieval: test-time retrieval against a real in-process memory (only written slots answer), the
uniform feature, the KL score and the phase-1 collapse check."""

import numpy as np
import pytest
import torch
from trainhelpers import FixedQuery

from memory_server.local import InProcessMemory
from pccnet.color import NUM_BINS
from trainer.retrieval import collapse_warning, retrieval_kl, retrieve_color_feature, uniform_color_feature


def _memory_with_one_far_written_slot(capacity: int = 64, dim: int = 8):
    mem = InProcessMemory(capacity=capacity, key_dim=dim, value_dim=NUM_BINS, seed=0, backend="torch")
    q = np.random.default_rng(1).normal(size=(2, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    value = np.full((1, NUM_BINS), 1e-6, np.float32)
    value[0, 7] = 1.0
    # The written key points away from both queries: it ranks last, behind every random unwritten key.
    far = -(q[0] + q[1])[None]
    mem.put(np.array([5]), far, value, item_ids=np.array([42]))
    return mem, q, value / value.sum()


def test_a_sparse_memory_is_searched_deeper_until_a_written_slot_answers():
    mem, q, value = _memory_with_one_far_written_slot()
    light = torch.zeros(2, 1, 16, 16)
    c, slots = retrieve_color_feature(FixedQuery(q), light, mem, k=4, capacity=64)
    assert slots.tolist() == [5, 5]
    np.testing.assert_allclose(c.numpy(), np.repeat(value, 2, 0), atol=1e-6)


def test_without_a_capacity_the_plain_top1_is_the_fallback():
    mem, q, _ = _memory_with_one_far_written_slot()
    c, slots = retrieve_color_feature(FixedQuery(q), torch.zeros(2, 1, 16, 16), mem, k=4)
    assert 5 not in slots.tolist()
    # Unwritten slots hold the uniform distribution.
    np.testing.assert_allclose(c.numpy(), np.full((2, NUM_BINS), 1.0 / NUM_BINS), atol=1e-6)


def test_the_best_written_slot_wins_when_several_are_written():
    mem = InProcessMemory(capacity=16, key_dim=4, value_dim=NUM_BINS, seed=0, backend="torch")
    keys = np.eye(4, dtype=np.float32)[:3]
    values = np.full((3, NUM_BINS), 1e-6, np.float32)
    values[np.arange(3), [10, 20, 30]] = 1.0
    mem.put(np.array([1, 2, 3]), keys, values, item_ids=np.array([0, 1, 2]))
    q = np.array([[0.1, 0.9, 0.2, 0.0]], np.float32)
    q /= np.linalg.norm(q)
    c, slots = retrieve_color_feature(FixedQuery(q), torch.zeros(1, 1, 16, 16), mem, k=16, capacity=16)
    assert slots.tolist() == [2] and int(c.argmax()) == 20


def test_the_uniform_feature_is_one_distribution_for_every_image():
    c = uniform_color_feature(3)
    assert c.shape == (3, NUM_BINS) and torch.allclose(c.sum(1), torch.ones(3, dtype=c.dtype))
    assert bool((c == c[0, 0]).all())
    # A retrieved feature equal to the own one scores 0 nats (up to the 1e-8 kl_divergence adds to q); a
    # one-hot retrieved for an image whose own feature is uniform scores log(313).
    one_hot = torch.full((1, NUM_BINS), 1e-12)
    one_hot[0, 5] = 1.0
    assert float(retrieval_kl(c[:1], c[:1])[0]) == pytest.approx(0.0, abs=1e-5)
    assert float(retrieval_kl(one_hot, c[:1])[0]) == pytest.approx(np.log(NUM_BINS), rel=1e-6)


@pytest.mark.parametrize(
    "filled, answers, n_probe, collapsed",
    [
        (0, 0, 32, True),    # nothing written: every update was a hit
        (5, 1, 32, True),    # one slot answers all 32 probed images
        (5, 1, 8, True),     # ... the smallest probe that counts
        (5, 1, 7, False),    # too few images to tell
        (5, 2, 32, False),   # two slots answer: not collapsed
        (5, 0, 0, False),    # no phase-1 image was probed (phase 1 skipped)
        (0, 0, 0, False),
    ],
)
def test_the_collapse_check_on_its_numbers(filled, answers, n_probe, collapsed):
    warning = collapse_warning(filled, 32, answers, n_probe, 100.0)
    assert (warning is not None) == collapsed
    if collapsed:
        assert f"{filled} of 32 slots written" in warning and f"answer {n_probe} training images" in warning
        assert "phase1.threshold 100 is probably too loose" in warning


def _ranked_reply(seed: int, b: int = 3, m: int = 24, dim: int = 8, unwritten: int = 5):
    """A memory (keys, Dirichlet values, item ids) and queries, plus the reply `query` gives for them: the
    values, sims and written flags of every slot, most similar first."""
    rng = np.random.default_rng(seed)
    keys = rng.normal(size=(m, dim))
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = rng.dirichlet(np.full(NUM_BINS, 0.3), size=m)
    item_ids = np.arange(m)
    item_ids[rng.choice(m, unwritten, replace=False)] = -1
    q = rng.normal(size=(b, dim))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ keys.T
    order = np.argsort(-sims, axis=1, kind="stable")
    reply = (values[order], np.take_along_axis(sims, order, 1), item_ids[order] >= 0)
    return (keys.astype(np.float32), values.astype(np.float32), item_ids), q.astype(np.float32), reply


@pytest.mark.parametrize("k", [1, 4, 16])
@pytest.mark.parametrize("mix", ["mean", "geometric", "medoid"])
@pytest.mark.parametrize("anneal", [1.0, 0.38])
def test_the_torch_free_runner_mixes_as_the_trainer_does(k, mix, anneal):
    """launch/onnx_colorize.py reimplements the mix in numpy alone: the same options give the same colour
    distribution and the same best slot (only written slots answer)."""
    from launch.onnx_colorize import OnnxColorizer
    from trainer.retrieval import RetrievalOptions, mix_values

    (keys, values, item_ids), q, (v, s, written) = _ranked_reply(seed=k + len(mix))
    options = RetrievalOptions(k=k, mix=mix, temperature=0.1, anneal=anneal)
    ours, best = mix_values(v, s, written, options)
    runner = object.__new__(OnnxColorizer)  # no graphs needed: retrieve() reads the pack and the options only
    runner.keys, runner.values, runner.item_ids = keys, values, item_ids
    runner.options = {"k": k, "mix": mix, "temperature": 0.1, "flip": False, "anneal": anneal}
    theirs, slots, _ = runner.retrieve(q)
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert (item_ids[slots] >= 0).all()
    assert np.array_equal(np.argmax(theirs, 1), np.argmax(ours, 1))


def test_anneal_sharpens_the_mix_and_keeps_its_order():
    """anneal 1 is the plain mix; below 1 the largest bin gains mass, the ranking of bins is kept, and a
    tiny anneal gives (nearly) the one-hot of the mix's mode without underflowing to NaN."""
    from trainer.retrieval import RetrievalOptions, mix_values

    _, _, (v, s, written) = _ranked_reply(seed=3)
    plain, _ = mix_values(v, s, written, RetrievalOptions(k=16))
    same, _ = mix_values(v, s, written, RetrievalOptions(k=16, anneal=1.0))
    sharp, _ = mix_values(v, s, written, RetrievalOptions(k=16, anneal=0.38))
    spike, _ = mix_values(v, s, written, RetrievalOptions(k=16, anneal=1e-3))
    np.testing.assert_array_equal(same, plain)
    np.testing.assert_allclose(sharp.sum(1), 1.0, atol=1e-5)
    assert (sharp.max(1) > plain.max(1)).all()
    for row_plain, row_sharp in zip(plain, sharp):
        top = np.argsort(-row_plain)[:20]
        assert np.array_equal(np.argsort(-row_sharp)[:20], top)
    assert np.isfinite(spike).all()
    assert (spike.max(1) > 0.99).all() and np.array_equal(spike.argmax(1), plain.argmax(1))


@pytest.mark.parametrize("bad", ["retrieval.anneal=0", "retrieval.anneal=-0.5", "retrieval.anneal=1.5"])
def test_anneal_outside_0_1_is_a_config_error_naming_it(bad):
    from trainer.config import ConfigError, TrainConfig, apply_override, config_from_dict, config_to_dict

    data = config_to_dict(TrainConfig())
    apply_override(data, bad)
    with pytest.raises(ConfigError, match=r"retrieval\.anneal"):
        config_from_dict(data)


def test_exclude_ids_leave_a_querys_own_slot_out():
    """Leave-one-out retrieval (phase2.feature_blend_towards: retrieved): the slot written with the query's own
    item id never answers it, also when the search has to go deeper to find another written slot."""
    mem = InProcessMemory(capacity=16, key_dim=4, value_dim=NUM_BINS, seed=0, backend="torch")
    keys = np.eye(4, dtype=np.float32)[:2]
    values = np.full((2, NUM_BINS), 1e-6, np.float32)
    values[np.arange(2), [10, 20]] = 1.0
    mem.put(np.array([1, 2]), keys, values, item_ids=np.array([7, 8]))
    q = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
    light = torch.zeros(2, 1, 16, 16)
    c, slots = retrieve_color_feature(FixedQuery(q), light, mem, k=1, capacity=16)
    assert slots.tolist() == [1, 2]
    # Each query's nearest slot is its own: left out, the other written slot answers, found by a deeper search.
    c, slots = retrieve_color_feature(FixedQuery(q), light, mem, k=1, capacity=16, exclude_ids=np.array([7, 8]))
    assert slots.tolist() == [2, 1] and c.argmax(1).tolist() == [20, 10]
    # An id no slot holds changes nothing.
    c, slots = retrieve_color_feature(FixedQuery(q), light, mem, k=1, capacity=16, exclude_ids=np.array([9, 9]))
    assert slots.tolist() == [1, 2]

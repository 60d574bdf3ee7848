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

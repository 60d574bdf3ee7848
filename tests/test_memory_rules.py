"""Unit tests of memory_server.rules and the search backends' deterministic ties."""

from __future__ import annotations

import numpy as np
import pytest
from memserver_helpers import reference_kl, unit

from memory_server import rules
from memory_server.backends import FaissSearcher, TorchSearcher


def test_normalize_rows_unit_norm_float32():
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32) * 1e-20
    out = rules.normalize_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float64), axis=1), 1, atol=1e-6)


def test_kl_matches_definition_and_zero_log_zero():
    p = np.array([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]], np.float32)
    v = np.array([[1.0, 1.0, 2.0], [3.0, 1.0, 0.0]], np.float32)
    got = rules.kl_divergence(p, v)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, [reference_kl(p[i], v[i]) for i in range(2)], rtol=1e-12)
    # p puts all mass where v has none: ln(0 + 1e-8) keeps it finite and large.
    assert got[1] == pytest.approx(-np.log(1e-8), rel=1e-6)


def test_kl_of_identical_rows_is_zero_and_never_below_threshold_zero():
    p = np.array([[0.2, 0.3, 0.5]], np.float32)
    kl = rules.kl_divergence(p, p)
    assert kl[0] >= 0 and kl[0] < 1e-7
    assert not (kl < 0.0).any()  # threshold 0 never hits


def test_merge_hit_keys_sums_duplicates_then_normalises():
    keys = unit(np.eye(4, dtype=np.float32)[:3] + 0.1)
    q = unit(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], np.float32))
    slots, new = rules.merge_hit_keys(keys, np.array([2, 0, 2]), q)
    np.testing.assert_array_equal(slots, [0, 2])
    want2 = keys[2].astype(np.float64) + q[0] + q[2]
    np.testing.assert_allclose(new[1], want2 / np.linalg.norm(want2), atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1, atol=1e-6)


def test_merge_of_opposite_query_keeps_key():
    keys = np.array([[1.0, 0.0]], np.float32)
    slots, new = rules.merge_hit_keys(keys, np.array([0]), -keys)
    np.testing.assert_array_equal(new, keys)


def test_choose_replacements_ties_go_to_lower_slots():
    scores = np.full(10, 3.0)
    np.testing.assert_array_equal(rules.choose_replacements(scores, np.array([1, 2]), 4), [0, 3, 4, 5])


def test_choose_replacements_orders_best_first_and_matches_lexsort():
    rng = np.random.default_rng(1)
    for _ in range(200):
        m = int(rng.integers(1, 40))
        scores = rng.integers(0, 5, m).astype(np.float64)  # many ties
        excluded = rng.choice(m, size=int(rng.integers(0, m)), replace=False)
        n = int(rng.integers(0, m - excluded.size + 1))
        ref = scores.copy()
        ref[excluded] = -np.inf
        want = np.lexsort((np.arange(m), -ref))[:n]
        np.testing.assert_array_equal(rules.choose_replacements(scores.copy(), excluded, n), want)


def test_age_noise_vector_is_bit_identical_to_rng_uniform():
    got = rules.age_noise_vector(1000, 4.0, 123)
    want = np.random.default_rng(123).uniform(-4.0, 4.0, 1000)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= -4 and got.max() <= 4


def _tied_keys(m=3000, d=24, distinct=40, seed=0):
    rng = np.random.default_rng(seed)
    base = unit(rng.standard_normal((distinct, d)).astype(np.float32))
    return np.ascontiguousarray(base[rng.integers(0, distinct, m)]), unit(rng.standard_normal((30, d)).astype(np.float32))


def _brute_topk(keys, q, k):
    # einsum in float64 gives identical rows identical sims (a BLAS sgemm may round them differently).
    s = np.einsum("qd,md->qm", q.astype(np.float64), keys.astype(np.float64))
    order = np.stack([np.lexsort((np.arange(keys.shape[0]), -row))[:k] for row in s])
    return order


@pytest.mark.parametrize("searcher_cls", [FaissSearcher, TorchSearcher], ids=["faiss", "torch-cpu"])
@pytest.mark.parametrize("k", [1, 5, 150, 300])
def test_search_ties_by_lower_slot(searcher_cls, k):
    keys, q = _tied_keys()
    searcher = searcher_cls(keys) if searcher_cls is FaissSearcher else searcher_cls(keys, device="cpu")
    sims, slots = searcher.search(q, k)
    np.testing.assert_array_equal(slots, _brute_topk(keys, q, k))
    assert (np.diff(sims, axis=1) <= 0).all()


def test_torch_searcher_chunks_and_sees_in_place_writes(monkeypatch):
    import memory_server.backends as b
    monkeypatch.setattr(b, "_TORCH_CHUNK", 100)  # several tiles at a tiny size
    rng = np.random.default_rng(3)
    keys = unit(rng.standard_normal((1050, 8)).astype(np.float32))
    q = unit(rng.standard_normal((7, 8)).astype(np.float32))
    s = TorchSearcher(keys, device="cpu")
    _, slots = s.search(q, 250)
    np.testing.assert_array_equal(slots, _brute_topk(keys, q, 250))
    keys[777] = q[0]
    s.keys_written(np.array([777]))
    assert s.search(q[:1], 1)[1][0, 0] == 777


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("k", [1, 300])
def test_torch_cuda_searcher_ties_and_in_place_writes(k):
    keys, q = _tied_keys()
    s = TorchSearcher(keys, device="cuda")
    np.testing.assert_array_equal(s.search(q, k)[1], _brute_topk(keys, q, k))
    keys[2999] = q[0]  # the device mirror must follow in-place writes
    s.keys_written(np.array([2999]))
    assert s.search(q[:1], 1)[1][0, 0] == 2999


def test_fix_ties_treats_identical_keys_as_equal_despite_gemm_rounding():
    from memory_server.backends import fix_ties
    keys = unit(np.random.default_rng(5).standard_normal((6, 4)).astype(np.float32))
    keys[4] = keys[1]
    keys[5] = keys[1]  # slots 1, 4, 5 identical
    q = keys[1:2].copy()
    # A kernel that rounded slot 5 one ulp up and slot 1 one ulp down; k = 2 keeps slots 4, 5 of 3.
    sims = np.array([[1.0 + 1e-7, 1.0, 1.0 - 1e-7]], np.float32)
    slots = np.array([[5, 4, 1]])
    got_sims, got_slots = fix_ties(sims, slots, 2, q, keys)
    np.testing.assert_array_equal(got_slots, [[1, 4]])  # the boundary tie pulled in the lower slot 1
    assert got_sims[0, 0] == got_sims[0, 1]
    s2, sl2 = fix_ties(np.array([[0.9, 0.9 - 1e-7]], np.float32), np.array([[3, 0]]), 1, q, keys)
    np.testing.assert_array_equal(sl2, [[3]])  # distinct keys: values decide, even when close


def test_fix_ties_finds_lower_duplicates_beyond_the_candidates():
    from memory_server.backends import fix_ties
    keys = unit(np.random.default_rng(6).standard_normal((12, 4)).astype(np.float32))
    for s in (2, 5, 7, 9):
        keys[s] = keys[0]  # slots 0, 2, 5, 7, 9 identical
    sims = np.array([[1.0, 1.0]], np.float32)  # a backend returned two of the copies, not the lowest
    got_sims, got_slots = fix_ties(sims, np.array([[9, 7]]), 1, keys[:1], keys)
    np.testing.assert_array_equal(got_slots, [[0]])
    assert got_sims[0, 0] == np.float32(1.0)

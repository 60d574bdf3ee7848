"""Pure numpy rules of a memory (PROTOCOL.md "Memories" and "The update rule").

Row normalisation, the KL divergence used for hit/miss and `query` targets, the merge of hit keys,
and the noisy-oldest replacement choice with deterministic ties. No state, no I/O, no BLAS threads
(einsum without `optimize` stays single-threaded, so it never competes with the search threads).
"""

from __future__ import annotations

import numpy as np

KL_EPS = 1e-8
_BLOCK_BYTES = 4 << 20  # float64 temporaries of row-wise work stay under 4 MiB (not held, not in RSS later)


def _rows(x: np.ndarray) -> int:
    """Rows per block of float64 work on `x`."""
    return max(1, _BLOCK_BYTES // (8 * max(1, x.shape[1])))


def row_norms(x: np.ndarray) -> np.ndarray:
    """L2 norm of each row of a 2-D array, accumulated in float64.  # [n, d] -> [n]"""
    out = np.empty(x.shape[0], np.float64)
    step = _rows(x)
    for i in range(0, x.shape[0], step):
        block = x[i:i + step].astype(np.float64)
        out[i:i + step] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def normalize_rows(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Unit-L2 rows as float32 (norms in float64); rows must have non-zero finite norm.  # [n, d]"""
    if out is None:
        out = np.empty(x.shape, np.float32)
    step = _rows(x)
    for i in range(0, x.shape[0], step):
        block = x[i:i + step].astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        block /= norms[:, None]
        out[i:i + step] = block
    return out


def normalize_distributions(v: np.ndarray) -> np.ndarray:
    """Rows scaled to sum 1, in float64 (rows must be non-negative with a positive sum).  # [n, dv]"""
    v64 = np.asarray(v, dtype=np.float64)
    return v64 / v64.sum(axis=1, keepdims=True)


def negentropy(p: np.ndarray) -> np.ndarray:
    """sum_t p_t ln p_t per row in float64, with 0 ln 0 = 0.  # [n, dv] -> [n]"""
    out = np.empty(p.shape[0], np.float64)
    step = _rows(p)
    for i in range(0, p.shape[0], step):
        block = p[i:i + step].astype(np.float64)
        logs = np.log(block, out=np.zeros_like(block), where=block > 0)
        out[i:i + step] = np.einsum("ij,ij->i", block, logs)
    return out


def log_targets(v_norm: np.ndarray) -> np.ndarray:
    """ln(v_t + 1e-8) of normalised target rows, float64.  # [n, dv]"""
    return np.log(v_norm + KL_EPS)


def kl_rows(p: np.ndarray, negent_p: np.ndarray, log_v: np.ndarray) -> np.ndarray:
    """KL(p_i || v_i) = max(0, sum p ln p - sum p ln(v + 1e-8)) per row, float64.  # [n]"""
    cross = np.einsum("ij,ij->i", p.astype(np.float64), log_v)
    return np.maximum(0.0, negent_p - cross)


def kl_divergence(p: np.ndarray, v: np.ndarray) -> np.ndarray:
    """KL(p || normalise(v)) row by row, the definition in PROTOCOL.md (reference form).  # [n]"""
    v_norm = normalize_distributions(v)
    return kl_rows(np.asarray(p), negentropy(np.asarray(p)), log_targets(v_norm))


def merge_hit_keys(keys: np.ndarray, hit_slots: np.ndarray, q_hat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each slot hit by one or more rows: normalise(keys[n] + sum of those rows).

    Returns (unique slots ascending [u], new keys [u, dk] float32). A sum of zero norm (a query exactly
    opposite to its only key, possible only when capacity is 1) keeps the old key.
    """
    order = np.argsort(hit_slots, kind="stable")  # rows grouped by slot, row order kept inside a group
    sorted_slots = hit_slots[order]
    first = np.r_[True, sorted_slots[1:] != sorted_slots[:-1]]
    uniq = sorted_slots[first]
    rows = q_hat[order].astype(np.float64)
    # ((keys[n] + q_a) + q_b) + ..., in row order and float64; most slots are hit by one row, so the
    # first rows go in one vectorised add and only the rare extra rows through add.at.
    acc = keys[uniq].astype(np.float64)
    acc += rows[first]
    if not first.all():
        np.add.at(acc, (np.cumsum(first) - 1)[~first], rows[~first])
    norms = np.sqrt(np.einsum("ij,ij->i", acc, acc))
    zero = norms == 0
    if zero.any():
        acc[zero] = keys[uniq[zero]]
        norms[zero] = 1.0
    acc /= norms[:, None]
    return uniq.astype(np.int64), acc.astype(np.float32)


def age_noise_vector(m: int, age_noise: float, seed: int | None, out: np.ndarray | None = None) -> np.ndarray:
    """r ~ U[-a, a] per slot, bit-identical to numpy.random.default_rng(seed).uniform(-a, a, m).  # [m] f64"""
    rng = np.random.default_rng(seed)
    if out is None:
        out = np.empty(m, np.float64)
    rng.random(out=out)
    # uniform(low, high) computes low + (high - low) * u; same operations, same rounding.
    out *= 2.0 * age_noise
    out += -age_noise
    return out


def replacement_scores(ages: np.ndarray, noise: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    """ages[j] + r_j in float64 (ages are already incremented by step 1).  # [m]"""
    out[:] = ages
    if noise is not None:
        out += noise
    return out


def choose_replacements(scores: np.ndarray, excluded: np.ndarray, n: int,
                        scratch: np.ndarray | None = None) -> np.ndarray:
    """The n slots of largest score, excluding `excluded`, best first; ties go to the lower slot.

    `scores` is overwritten at `excluded` (-inf). Runs in O(m): a partition finds the n-th largest
    score t, then every slot above t plus the lowest-index slots equal to t.  # [m] -> [n] int64
    """
    m = scores.shape[0]
    if n <= 0:
        return np.empty(0, np.int64)
    if excluded.size:
        scores[excluded] = -np.inf
    if n > m - np.unique(excluded).size:
        raise ValueError(f"cannot choose {n} replacement slots among {m} with {excluded.size} excluded")
    part = np.empty(m, np.float64) if scratch is None else scratch
    part[:] = scores
    part.partition(m - n)
    t = part[m - n]
    above = np.flatnonzero(scores > t)
    if above.size:
        above = above[np.lexsort((above, -scores[above]))]
    equal = np.flatnonzero(scores == t)[: n - above.size]  # flatnonzero is ascending: lower slots first
    return np.concatenate([above, equal]).astype(np.int64)

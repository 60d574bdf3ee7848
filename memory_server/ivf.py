"""`--index approximate`: a FAISS IVF index (8-bit scalar-quantised lists) over a memory's keys.

The index holds one entry per slot, its id the slot number, and follows every overwrite (remove_ids +
add_with_ids of the written slots; a hashtable direct map makes the removal cheap). A search probes
`nprobe` of `nlist` lists, takes the best `candidates(k)` slots by their quantised scores, and re-ranks
them against the float32 keys in float64, so the similarities returned are exact and equal scores are
ordered by lower slot; only the choice of candidates is approximate (recall measured in
benchmarks/memory_scale.py).

The coarse centroids are trained on the memory's own written keys once `train_min` slots are written
(random initial keys would give a partition that the data does not follow); until then every search is
exact (faiss.knn, the default path). The trained index is saved in snapshots (`state()`), so a restart
loads it instead of training again, and slots written by log records replayed after that snapshot are
re-indexed when the searcher is attached. Anything going wrong with the index (a failed training, an
allocation failure while syncing) drops it back to exact search instead of failing the request: the
index is an accelerator, the float32 keys stay the truth.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from .backends import FaissSearcher, import_faiss

log = logging.getLogger(__name__)

TRAIN_POINTS_PER_LIST = 32  # k-means sample: 32 keys per list (faiss warns below 39; fine for IP lists)
_RERANK_BLOCK_FLOATS = 4 << 20  # float64 gathered keys per re-rank block (32 MiB)
_KMEANS_ITERS = 10
_DIRECT_MAP_BYTES = 48  # per slot: faiss's hashtable direct map (std::unordered_map node), measured ~40


def ivf_lists(capacity: int) -> int:
    """Number of IVF lists for a memory of `capacity` slots: the power of two nearest sqrt(m), >= 1."""
    return max(1, min(65_536, 2 ** round(math.log2(max(1.0, math.sqrt(capacity))))))


def default_nprobe(nlist: int) -> int:
    """Lists probed per query: 1/128 of them, at least 8 (recall@1 1.000 at m = 2e5 with 8 of 512 lists on
    the clustered keys of benchmarks/memory_scale.py; 1/32 at m = 1e6 gave the same recall at 2.5x exact)."""
    return min(nlist, max(8, nlist // 128))


def train_min(capacity: int) -> int:
    """Written slots needed before the index is trained (exact search until then)."""
    return min(capacity, TRAIN_POINTS_PER_LIST * ivf_lists(capacity))


def candidates(k: int) -> int:
    """Slots taken from the index for an exact re-rank of a top-k query."""
    return k + max(32, k)


class IvfSearcher:
    """Approximate candidates from an IVF-SQ8 index, exact float64 re-rank against the float32 keys."""

    def __init__(self, keys: np.ndarray, written: np.ndarray, nprobe: int | None = None,
                 state: np.ndarray | None = None, pending: np.ndarray | None = None) -> None:
        self._faiss = import_faiss()
        self.keys, self.written = keys, written
        m, dk = keys.shape
        self.nlist = ivf_lists(m)
        self.nprobe = min(self.nlist, nprobe) if nprobe else default_nprobe(self.nlist)
        self.train_min = train_min(m)
        self.exact = FaissSearcher(keys)
        self.index: Any = None
        self.name = "faiss-ivf"
        self.trainings = 0
        if state is not None and state.size:
            self._load(state, pending)
        if self.index is None:
            self._maybe_train()

    # ---- building -------------------------------------------------------------------------------

    def _load(self, state: np.ndarray, pending: np.ndarray | None) -> None:
        """Adopt a snapshotted index, re-indexing the slots written since (log replay)."""
        faiss = self._faiss
        try:
            index = faiss.deserialize_index(np.ascontiguousarray(state, np.uint8))  # returns the IVF subclass
            m, dk = self.keys.shape
            if index.d != dk or index.ntotal != m or getattr(index, "nlist", -1) != self.nlist:
                log.warning("snapshotted index does not fit this memory (d %s, %s entries, %s lists): rebuilding",
                            index.d, index.ntotal, getattr(index, "nlist", "?"))
                return
            index.nprobe = self.nprobe
            self.index = index
            if pending is not None and pending.size:
                self._sync(np.unique(pending))
        except Exception as exc:  # noqa: BLE001 - a bad index must not stop recovery: rebuild it
            log.warning("snapshotted index unusable (%s: %s): rebuilding", type(exc).__name__, exc)
            self.index = None

    def _maybe_train(self) -> None:
        """Train and fill the index once enough slots are written; on any failure stay exact."""
        written = int(np.count_nonzero(self.written))
        if written < self.train_min:
            return
        faiss = self._faiss
        t0 = time.perf_counter()
        m, dk = self.keys.shape
        try:
            slots = np.flatnonzero(self.written)
            n = min(slots.size, TRAIN_POINTS_PER_LIST * self.nlist)
            sample = np.sort(np.random.default_rng(0).choice(slots, n, replace=False))
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dk), dk, self.nlist,
                                                  faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = _KMEANS_ITERS
            index.cp.seed = 1234
            index.cp.min_points_per_centroid = 1  # a small memory may train on < 39 keys per list
            index.train(np.ascontiguousarray(self.keys[sample]))
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
            step = 1 << 16
            for i in range(0, m, step):  # blocks: no float32 copy of all keys at once
                j = min(i + step, m)
                index.add_with_ids(self.keys[i:j], np.arange(i, j, dtype=np.int64))
            index.nprobe = self.nprobe
        except Exception as exc:  # noqa: BLE001 - e.g. MemoryError: keep searching exactly
            log.warning("training the IVF index failed (%s: %s): exact search continues", type(exc).__name__, exc)
            return
        self.index = index
        self.trainings += 1
        log.info("IVF index trained: %d lists on %d of %d written keys, %d slots indexed, nprobe %d, in %.1f s",
                 self.nlist, n, written, m, self.nprobe, time.perf_counter() - t0)

    def _sync(self, slots: np.ndarray) -> None:
        index = self.index
        ids = np.ascontiguousarray(slots, np.int64)
        index.remove_ids(ids)
        index.add_with_ids(np.ascontiguousarray(self.keys[ids]), ids)

    # ---- the Searcher interface -----------------------------------------------------------------

    @property
    def trained(self) -> bool:
        return self.index is not None

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.keys.shape[0]
        c = candidates(k)
        # Exact while untrained, and when the candidates would cover much of the memory anyway.
        if self.index is None or c * 8 > m:
            return self.exact.search(q, k)
        _, cand = self.index.search(np.ascontiguousarray(q, np.float32), c)
        sims, slots = self._rerank(q, cand, k)
        short = np.flatnonzero(slots[:, -1] < 0)  # probed lists held fewer than k slots: exact rows
        if short.size:
            es, ei = self.exact.search(np.ascontiguousarray(q[short]), k)
            sims[short], slots[short] = es, ei
        return sims, slots

    def _rerank(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact float64 sims of the candidates, top-k by (-sim, slot); missing candidates (-1) last."""
        b_rows, c = cand.shape
        dk = self.keys.shape[1]
        sims = np.empty((b_rows, k), np.float32)
        slots = np.empty((b_rows, k), np.int64)
        step = max(1, _RERANK_BLOCK_FLOATS // (c * dk))
        for r0 in range(0, b_rows, step):
            ids = cand[r0:r0 + step]
            valid = ids >= 0
            gathered = self.keys[np.where(valid, ids, 0)].astype(np.float64)  # [r, c, dk]
            # einsum without BLAS: every (row, key) pair summed in the same order, so identical keys tie
            s = np.einsum("rcd,rd->rc", gathered, q[r0:r0 + step].astype(np.float64))
            s[~valid] = -np.inf
            tie_slot = np.where(valid, ids, np.iinfo(np.int64).max)
            order = np.lexsort((tie_slot, -s), axis=-1)[:, :k]
            top_s = np.take_along_axis(s, order, 1)
            top_i = np.take_along_axis(ids, order, 1)
            top_i[~np.isfinite(top_s)] = -1
            sims[r0:r0 + step], slots[r0:r0 + step] = top_s, top_i
        return sims, slots

    def keys_written(self, slots: np.ndarray) -> None:
        if slots.size == 0:
            return
        if self.index is None:
            self._maybe_train()
            return
        try:
            self._sync(slots)
        except Exception as exc:  # noqa: BLE001 - commit must not fail: drop the index, train again later
            log.warning("syncing the IVF index failed (%s: %s): back to exact search", type(exc).__name__, exc)
            self.index = None

    def state(self) -> np.ndarray | None:
        """The serialised index for a snapshot (None while untrained)."""
        if self.index is None:
            return None
        return self._faiss.serialize_index(self.index)

    def close(self) -> None:
        self.index = None

    @staticmethod
    def planned_nbytes(capacity: int, key_dim: int) -> int:
        """Codes (1 byte per dimension), ids and direct map per slot; centroids; the re-rank block."""
        nlist = ivf_lists(capacity)
        per_slot = key_dim + 8 + _DIRECT_MAP_BYTES
        return capacity * per_slot + 2 * nlist * key_dim * 4 + _RERANK_BLOCK_FLOATS * 8

    def nbytes(self) -> int:
        return self.planned_nbytes(*self.keys.shape)

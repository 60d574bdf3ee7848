"""Exact inner-product search backends over a preallocated key array, with deterministic ties.

`faiss` searches the live numpy key array directly (faiss.knn: blocked sgemm + top-k, no index to
rebuild); `torch` keeps a device mirror of the keys (CUDA, or a zero-copy view on the CPU) and does a
chunked matmul + topk into a preallocated buffer. torch and faiss are imported lazily, only here.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("auto", "faiss", "torch")
INDEX_CHOICES = ("exact", "approximate")
KEY_DTYPE_CHOICES = ("float32", "tf32", "bfloat16")
_TORCH_CHUNK = 65_536  # key rows per matmul tile: [B, 65536] f32 tile = 64 MiB at B = 256
_TORCH_TILE_ROWS = 256  # query rows per tile, so the tile a memory holds is bounded in advance
_EXACT_BLOCK_ROWS = 8192  # key rows per float64 block when a row's sims are recomputed exactly
TIE_TOL = 1e-5  # |sim difference| below which identical keys are checked for a tie (GEMM rounding)


class BackendUnavailable(RuntimeError):
    """The requested search backend cannot run here (missing package or device)."""


def import_faiss() -> Any:
    """Import faiss or raise BackendUnavailable with the install hint."""
    try:
        import faiss  # noqa: PLC0415 - optional heavy dependency, imported on first use
    except ImportError as exc:
        raise BackendUnavailable(
            f"faiss is not installed ({exc}); install pccnet[cpu] or pccnet[gpu]"
        ) from exc
    return faiss


def import_torch() -> Any:
    """Import torch or raise BackendUnavailable."""
    try:
        import torch  # noqa: PLC0415 - only the torch backend needs it
    except ImportError as exc:
        raise BackendUnavailable(f"--backend torch needs torch ({exc})") from exc
    return torch


def nvidia_gpu_visible() -> bool:
    """Cheap check for an NVIDIA driver and device node (no CUDA initialisation)."""
    return os.path.exists("/proc/driver/nvidia/version") or bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_backend(choice: str) -> str:
    """Concrete backend name for a --backend choice: faiss-cpu, faiss-gpu, torch-cuda or torch-cpu."""
    if choice not in BACKEND_CHOICES:
        raise BackendUnavailable(f"unknown backend {choice!r}; choose one of {BACKEND_CHOICES}")
    if choice == "torch":
        torch = import_torch()
        return "torch-cuda" if torch.cuda.is_available() else "torch-cpu"
    if choice == "faiss":
        faiss = import_faiss()
        return "faiss-gpu" if getattr(faiss, "get_num_gpus", lambda: 0)() > 0 else "faiss-cpu"
    try:
        faiss = import_faiss()
    except BackendUnavailable:  # auto without faiss: torch on CUDA can still serve (GPU images)
        faiss = None
    gpus = faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0
    # auto: faiss-gpu when installed with a GPU; torch on CUDA when a GPU exists without faiss-gpu.
    if gpus > 0:
        return "faiss-gpu"
    if not nvidia_gpu_visible():
        return "faiss-cpu"  # importing torch only to learn there is no GPU costs seconds
    try:
        torch = import_torch()
        if torch.cuda.is_available():
            return "torch-cuda"
    except BackendUnavailable:
        pass
    if faiss is None:
        import_faiss()  # raises the clear "install pccnet[cpu] or pccnet[gpu]" error
    return "faiss-cpu"


@dataclass(frozen=True)
class IndexOptions:
    """How a store searches: `--index`, `--key-dtype` (torch backend) and the IVF lists probed."""

    index: str = "exact"
    key_dtype: str = "float32"
    nprobe: int | None = None  # --index approximate: None = ivf.default_nprobe


def check_index_options(backend: str, opts: IndexOptions) -> None:
    """BackendUnavailable naming the value when the options do not fit the resolved backend."""
    if opts.index not in INDEX_CHOICES:
        raise BackendUnavailable(f"unknown --index {opts.index!r}; choose one of {INDEX_CHOICES}")
    if opts.key_dtype not in KEY_DTYPE_CHOICES:
        raise BackendUnavailable(f"unknown --key-dtype {opts.key_dtype!r}; choose one of {KEY_DTYPE_CHOICES}")
    if opts.index == "approximate" and backend != "faiss-cpu":
        raise BackendUnavailable(f"--index approximate runs on the faiss-cpu backend, not {backend!r} "
                                 "(use --backend faiss on a CPU server)")
    if opts.key_dtype != "float32" and not backend.startswith("torch"):
        raise BackendUnavailable(f"--key-dtype {opts.key_dtype} needs --backend torch (resolved backend {backend!r})")
    if opts.nprobe is not None and opts.nprobe < 1:
        raise BackendUnavailable(f"--ivf-nprobe must be >= 1, got {opts.nprobe}")


class Searcher(Protocol):
    """Exact top-k inner-product search over one memory's keys."""

    name: str

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (sims [B,k] f32 descending, slots [B,k] i64), ties by lower slot."""

    def keys_written(self, slots: np.ndarray) -> None:
        """Rows `slots` of the key array changed in place."""

    def close(self) -> None:
        """Release device memory."""

    def nbytes(self) -> int:
        """Bytes this searcher holds beyond the memory's own arrays (host and device), for the accounting."""


def searcher_nbytes(backend: str, capacity: int, key_dim: int, opts: IndexOptions | None = None) -> int:
    """What a searcher of `backend` will hold for a memory of this shape (checked before a create).

    Each searcher's `nbytes()` reports the same figure once built; a new index type (e.g. an approximate
    one) adds its own line here and in its class.
    """
    opts = opts or IndexOptions()
    if backend == "faiss-cpu" and opts.index == "approximate":
        from .ivf import IvfSearcher  # noqa: PLC0415 - ivf imports this module
        return IvfSearcher.planned_nbytes(capacity, key_dim)
    if backend == "faiss-cpu":
        return FaissSearcher.planned_nbytes(capacity, key_dim)
    if backend in ("faiss-gpu", "torch-cuda", "torch-cpu"):
        return TorchSearcher.planned_nbytes(capacity, key_dim, on_device=backend != "torch-cpu",
                                            key_dtype=opts.key_dtype)
    raise BackendUnavailable(f"unknown backend {backend!r}")


def exact_row_sims(keys: np.ndarray, q_row: np.ndarray) -> np.ndarray:
    """All m similarities of one query in float64, identical keys giving identical values.  # [m]"""
    q64 = q_row.astype(np.float64)
    out = np.empty(keys.shape[0], np.float64)
    for i in range(0, keys.shape[0], _EXACT_BLOCK_ROWS):  # blocks: never a float64 copy of all keys
        out[i:i + _EXACT_BLOCK_ROWS] = keys[i:i + _EXACT_BLOCK_ROWS].astype(np.float64) @ q64
    return out


def identical_rows(keys: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Ascending slots whose key equals `row` bit for bit (a first-column filter, then whole rows)."""
    cand = np.flatnonzero(keys[:, 0] == row[0])
    return cand[np.all(keys[cand] == row, axis=1)]


def _boundary_row(sims: np.ndarray, slots: np.ndarray, k: int, q_row: np.ndarray,
                  keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one row whose k-th and (k+1)-th candidates tie: lower slots beyond k' may belong in it."""
    v = sims[k - 1]
    tied = slots[sims == v]
    if all(np.array_equal(keys[t], keys[tied[0]]) for t in tied[1:]):
        # The usual case: duplicate keys. Every copy ties; the lowest slots win the places left.
        above = np.flatnonzero(sims > v)
        group = identical_rows(keys, keys[tied[0]])[: k - above.size]
        return (np.concatenate([sims[above], np.full(group.size, v, sims.dtype)]),
                np.concatenate([slots[above], group]))
    s = exact_row_sims(keys, q_row)  # distinct keys with bitwise-equal sims: recompute the row exactly
    order = np.lexsort((np.arange(s.shape[0]), -s))[:k]
    return s[order].astype(sims.dtype), order


def fix_ties(sims: np.ndarray, slots: np.ndarray, k: int, q: np.ndarray,
             keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic ties: equal similarities ordered by lower slot, across the k boundary too.

    `sims`/`slots` hold a backend's top-k' (k' = k+1 when more slots exist), sorted descending. Two
    slots tie when their computed sims are equal or when their keys are bitwise identical: a GEMM
    kernel may round the same dot product differently at different positions, so identical keys
    within TIE_TOL first get one similarity. A row whose k-th and (k+1)-th candidates then tie may
    have lost a lower slot beyond k' and is recomputed exactly over all keys.
    """
    kp = sims.shape[1]
    if kp > 1:
        r, j = np.nonzero(np.abs(sims[:, :-1] - sims[:, 1:]) <= TIE_TOL)
        if r.size:
            a, b = slots[r, j], slots[r, j + 1]
            maybe = keys[a, 0] == keys[b, 0]  # cheap filter before comparing whole rows
            r, j, a, b = r[maybe], j[maybe], a[maybe], b[maybe]
            same = np.all(keys[a] == keys[b], axis=1) if r.size else np.zeros(0, bool)
            if same.any():
                sims = sims.copy()
                for rr, jj in zip(r[same], j[same], strict=True):  # ascending: chains carry left to right
                    sims[rr, jj + 1] = sims[rr, jj]
    if kp > k:
        boundary = np.flatnonzero(sims[:, k] == sims[:, k - 1])
        top_s, top_i = sims[:, :k].copy(), slots[:, :k].copy()
        for i in boundary:
            top_s[i], top_i[i] = _boundary_row(sims[i], slots[i], k, q[i], keys)
        sims, slots = top_s, top_i
    if k > 1:
        rows = np.flatnonzero(np.any(sims[:, 1:] == sims[:, :-1], axis=1))
        for i in rows:
            order = np.lexsort((slots[i], -sims[i]))
            sims[i], slots[i] = sims[i][order], slots[i][order]
    return sims, slots


class FaissSearcher:
    """faiss.knn on the live key array: exact, no index object to keep in sync."""

    def __init__(self, keys: np.ndarray) -> None:
        self._faiss = import_faiss()
        self.keys = keys
        self.name = "faiss-cpu"

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        # faiss's heap (k<100) and reservoir (k>=100) paths may drop a lower slot tied at the boundary,
        # and its BLAS may round identical keys differently: one extra candidate, then fix_ties.
        kp = min(k + 1, self.keys.shape[0])
        sims, slots = self._faiss.knn(q, self.keys, kp, metric=self._faiss.METRIC_INNER_PRODUCT)
        return fix_ties(sims, slots, k, q, self.keys)

    def keys_written(self, slots: np.ndarray) -> None:
        """The search reads the numpy array itself: nothing to sync."""

    def close(self) -> None:
        """Nothing to release."""

    @staticmethod
    def planned_nbytes(capacity: int, key_dim: int) -> int:
        """faiss.knn searches the memory's own key array: no index to hold."""
        return 0

    def nbytes(self) -> int:
        return 0


class TorchSearcher:
    """Chunked matmul + topk on a torch mirror of the keys (CUDA), or a zero-copy CPU view."""

    def __init__(self, keys: np.ndarray, device: str | None = None, use_faiss_gpu: bool = False,
                 key_dtype: str = "float32") -> None:
        torch = import_torch()
        self._torch = torch
        self.keys = keys
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.key_dtype = key_dtype
        # bfloat16: a half-size mirror (on the CPU too, where float32 is a zero-copy view); tf32: float32
        # keys, TF32 tensor-core matmuls (CUDA only; the CPU computes float32 whatever the flag).
        self._mm_dtype = torch.bfloat16 if key_dtype == "bfloat16" else torch.float32
        if self.device.type == "cpu" and key_dtype != "bfloat16":
            self.dev_keys = torch.from_numpy(keys)  # shares memory: in-place writes are seen
        else:
            self.dev_keys = torch.from_numpy(keys).to(self.device, self._mm_dtype)
        self._tile: Any = None
        self._faiss_res: Any = None
        self.name = f"torch-{self.device.type}"
        if use_faiss_gpu:
            import faiss.contrib.torch_utils  # noqa: F401, PLC0415 - lets knn_gpu take torch tensors
            self._faiss = import_faiss()
            self._faiss_res = faiss.StandardGpuResources()
            self.name = "faiss-gpu"

    @staticmethod
    def planned_nbytes(capacity: int, key_dim: int, on_device: bool, key_dtype: str = "float32") -> int:
        """The mirror of the keys (none on the CPU in float32, where it is a view) plus the largest tile."""
        if key_dtype == "bfloat16":
            mirror = capacity * key_dim * 2
        else:
            mirror = capacity * key_dim * 4 if on_device else 0
        return mirror + _TORCH_TILE_ROWS * min(capacity, _TORCH_CHUNK) * 4

    def nbytes(self) -> int:
        m, dk = self.keys.shape
        return self.planned_nbytes(m, dk, self.device.type != "cpu", self.key_dtype)

    def _tile_for(self, rows: int, cols: int) -> Any:
        """A contiguous [rows, cols] view of one reusable buffer of _TORCH_TILE_ROWS x min(m, chunk)."""
        torch = self._torch
        if self._tile is None:
            size = _TORCH_TILE_ROWS * min(self.keys.shape[0], _TORCH_CHUNK)
            self._tile = torch.empty(size, dtype=self._mm_dtype, device=self.device)
        return self._tile[: rows * cols].view(rows, cols)

    def _topk(self, qt: Any, k: int) -> tuple[Any, Any]:
        torch = self._torch
        m = self.dev_keys.shape[0]
        if self._faiss_res is not None:
            sims, slots = self._faiss.knn_gpu(self._faiss_res, qt, self.dev_keys, k,
                                              metric=self._faiss.METRIC_INNER_PRODUCT)
            return sims, slots
        best_s = best_i = None
        for j0 in range(0, m, _TORCH_CHUNK):
            j1 = min(j0 + _TORCH_CHUNK, m)
            tile = self._tile_for(qt.shape[0], j1 - j0)
            torch.matmul(qt, self.dev_keys[j0:j1].T, out=tile)
            s, i = torch.topk(tile, min(k, j1 - j0), dim=1, largest=True, sorted=True)
            s = s.float()
            i = i + j0
            if best_s is None:
                best_s, best_i = s, i
            else:
                cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                best_s, pos = torch.topk(cat_s, min(k, cat_s.shape[1]), dim=1, largest=True, sorted=True)
                best_i = torch.gather(cat_i, 1, pos)
        return best_s, best_i

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        m = self.keys.shape[0]
        kp = min(k + 1, m)
        sims = np.empty((q.shape[0], kp), np.float32)
        slots = np.empty((q.shape[0], kp), np.int64)
        prev = torch.backends.cuda.matmul.allow_tf32
        try:
            if self.device.type == "cuda":  # float32 keys search in strict fp32 unless --key-dtype tf32
                torch.backends.cuda.matmul.allow_tf32 = self.key_dtype == "tf32"
            with torch.no_grad():
                for r0 in range(0, q.shape[0], _TORCH_TILE_ROWS):  # row blocks keep the tile bounded
                    qt = torch.from_numpy(np.ascontiguousarray(q[r0:r0 + _TORCH_TILE_ROWS])).to(
                        self.device, self._mm_dtype)
                    s, i = self._topk(qt, kp)
                    sims[r0:r0 + _TORCH_TILE_ROWS], slots[r0:r0 + _TORCH_TILE_ROWS] = s.cpu().numpy(), i.cpu().numpy()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        if self.key_dtype != "float32":
            # Reduced-precision sims are rounded (bf16: 3 digits), so equal scores are common and the
            # exact boundary recomputation of fix_ties would run on most rows: order ties by lower slot
            # over the k + 1 candidates, then cut, so a tie at the k-th place keeps the lower slot (the
            # recall against float32 search is measured, not exact).
            sims, slots = order_ties(sims, slots)
            return sims[:, :k], slots[:, :k]
        return fix_ties(sims, slots, k, q, self.keys)

    def keys_written(self, slots: np.ndarray) -> None:
        if (self.device.type == "cpu" and self.key_dtype != "bfloat16") or slots.size == 0:
            return
        torch = self._torch
        idx = torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)
        rows = torch.from_numpy(np.ascontiguousarray(self.keys[slots])).to(self.device, self._mm_dtype)
        self.dev_keys.index_copy_(0, idx, rows)

    def close(self) -> None:
        self.dev_keys = None
        self._tile = None
        if self.device.type == "cuda":
            self._torch.cuda.empty_cache()


def order_ties(sims: np.ndarray, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows re-sorted by (-sim, slot) where equal sims occur (deterministic order of returned ties)."""
    sims, slots = np.ascontiguousarray(sims), np.ascontiguousarray(slots)
    if sims.shape[1] > 1:
        for i in np.flatnonzero(np.any(sims[:, 1:] == sims[:, :-1], axis=1)):
            order = np.lexsort((slots[i], -sims[i]))
            sims[i], slots[i] = sims[i][order], slots[i][order]
    return sims, slots


def make_searcher(backend: str, keys: np.ndarray, opts: IndexOptions | None = None,
                  written: np.ndarray | None = None, state: np.ndarray | None = None,
                  pending: np.ndarray | None = None) -> Searcher:
    """A searcher of the resolved `backend` name over `keys` [m, dk] float32 (C-contiguous).

    `written` (the memory's written-slot flags), `state` (a snapshotted index) and `pending` (slots
    written since that snapshot) serve the approximate index only.
    """
    opts = opts or IndexOptions()
    if backend == "faiss-cpu" and opts.index == "approximate":
        from .ivf import IvfSearcher  # noqa: PLC0415 - ivf imports this module
        assert written is not None, "the approximate index trains on the written slots"
        return IvfSearcher(keys, written, opts.nprobe, state, pending)
    if backend == "faiss-cpu":
        return FaissSearcher(keys)
    if backend == "faiss-gpu":
        return TorchSearcher(keys, device="cuda", use_faiss_gpu=True)
    if backend == "torch-cuda":
        return TorchSearcher(keys, device="cuda", key_dtype=opts.key_dtype)
    if backend == "torch-cpu":
        return TorchSearcher(keys, device="cpu", key_dtype=opts.key_dtype)
    raise BackendUnavailable(f"unknown backend {backend!r}")

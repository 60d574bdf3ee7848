"""The colour feature G is conditioned on: retrieved from the memory (METHOD.md 3.4), or uniform.

The one home of test-time retrieval (phase-1 validation, the collapse check, colorize, evaluate
--retrieval all call `retrieve_color_feature`), of the uniform feature of the "without M" ablation, and
of the KL score of a retrieved feature against the image's own. `memory` is anything with the
MemoryClient `query` signature (MemoryClient, InProcessMemory). Imports pccnet only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pccnet.color import NUM_BINS
from pccnet.losses import kl_divergence

DEFAULT_K = 16  # first search depth (at least 4 x the slots mixed); a sparsely written memory is searched deeper (x4 per round)


def uniform_color_feature(batch: int, device: torch.device | str = "cpu") -> Tensor:
    """The "without M" ablation's colour feature: the uniform distribution [B, 313], the same for every image."""
    return torch.full((batch, NUM_BINS), 1.0 / NUM_BINS, device=device)


@dataclass(frozen=True)
class RetrievalOptions:
    """How test-time retrieval forms its answer (the `retrieval:` config section, trainer.config).

    The defaults are the paper's: the value of the single most similar written slot.
    """

    k: int = 1
    temperature: float = 0.1
    mix: str = "mean"
    flip: bool = False
    anneal: float = 1.0

    @classmethod
    def of(cls, cfg) -> RetrievalOptions:
        """From a RetrievalConfig (or anything with its fields); None gives the paper's top-1."""
        if cfg is None:
            return cls()
        return cls(k=cfg.k, temperature=cfg.temperature, mix=cfg.mix, flip=cfg.flip, anneal=getattr(cfg, "anneal", 1.0))


PAPER = RetrievalOptions()


def query_features(extractor, light: Tensor, flip: bool = False) -> Tensor:
    """The extractor's query for network-scaled light [B,1,S,S]; with flip, the re-normalised mean of the
    features of the image and its mirror image (a flower's colours do not depend on its orientation)."""
    q = extractor(light)
    if flip:
        q = F.normalize(q + extractor(torch.flip(light, dims=(-1,))), dim=-1)
    return q


@torch.no_grad()
def retrieve_color_feature(extractor, light: Tensor, memory, name: str | None = None,
                           capacity: int | None = None, k: int = DEFAULT_K,
                           options: RetrievalOptions = PAPER, exclude_ids: np.ndarray | None = None
                           ) -> tuple[Tensor, np.ndarray]:
    """Network-scaled light [B,1,S,S] -> (colour feature [B,313], slot ids [B] of the best written slot).

    Slots never written still hold their random initial keys and uniform values; only written slots
    (item id >= 0) answer. Queries with fewer than options.k written slots among the top-k are asked
    again with 4x the k (up to `capacity`): a sparsely written memory would otherwise answer them with
    a uniform value. The answer mixes the values of the options.k best written slots (mix_values).
    exclude_ids [B] int64: a slot whose item id is the query's own does not answer it (leave-one-out, for
    training images the memory was written from).
    """
    query = query_features(extractor, light, options.flip).float().cpu().numpy()
    return retrieve_for_queries(query, memory, name=name, capacity=capacity, k=k, options=options, device=light.device,
                                exclude_ids=exclude_ids)


def retrieve_for_queries(query: np.ndarray, memory, name: str | None = None, capacity: int | None = None,
                         k: int = DEFAULT_K, options: RetrievalOptions = PAPER,
                         device: torch.device | str = "cpu", exclude_ids: np.ndarray | None = None
                         ) -> tuple[Tensor, np.ndarray]:
    """retrieve_color_feature for ready-made queries [B, dim] (unit vectors)."""

    def answering(item_ids: np.ndarray, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        ok = item_ids >= 0
        return ok if exclude_ids is None else ok & (item_ids != exclude_ids[rows, None])

    want = options.k
    k = max(k, 4 * want)
    if capacity is not None:
        k = min(k, capacity)
    fields = ("values", "item_ids")
    reply = memory.query(query, k=k, fields=fields, memory=name)
    values, sims, written = reply["values"], reply["sims"], answering(reply["item_ids"])
    slots = reply["slots"]
    short = np.flatnonzero(written.sum(1) < want)
    while short.size and capacity is not None and k < capacity:
        k = min(4 * k, capacity)
        again = memory.query(query[short], k=k, fields=fields, memory=name)
        values, sims, written, slots = (_widen(a, k) for a in (values, sims, written, slots))
        w = again["values"].shape[1]
        values[short, :w], sims[short, :w] = again["values"], again["sims"]
        written[short, :w], slots[short, :w] = answering(again["item_ids"], short), again["slots"]
        short = short[written[short].sum(1) < want]
    c, best = mix_values(values, sims, written, options)
    # Nothing written anywhere in reach: the plain top-1 (a uniform value of an unwritten slot).
    none = ~written.any(1)
    c[none] = values[none, 0]
    best_slot = np.where(none, slots[:, 0], slots[np.arange(len(best)), best])
    return torch.from_numpy(c.astype(np.float32)).to(device), best_slot


def _widen(a: np.ndarray, k: int) -> np.ndarray:
    """A [B, k0(, ...)] reply field padded to k columns (zeros / False), a copy."""
    if a.shape[1] >= k:
        return a.copy()
    pad = np.zeros((a.shape[0], k - a.shape[1], *a.shape[2:]), a.dtype)
    return np.concatenate([a, pad], 1)


def mix_values(values: np.ndarray, sims: np.ndarray, written: np.ndarray,
               options: RetrievalOptions = PAPER) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the colour feature mixed from its options.k most similar written slots.

    values [B,k,313] ranked by similarity sims [B,k]; written [B,k] marks slots holding an item. Returns
    (features [B,313], index in k of the best written slot [B]). Weights: softmax of the similarities
    over options.temperature. k = 1 is the paper's top-1 value whatever the mix. An anneal below 1 then
    sharpens the mix, p ** (1 / anneal) renormalised (the annealed mean of Zhang et al. 2016): a blend of
    many histograms keeps their coverage but gets back the peaks a single answer has.
    """
    b, _, bins = values.shape
    rank = np.cumsum(written, 1)  # 1-based rank among written slots
    chosen = written & (rank <= options.k)  # [B, k]
    best = written.argmax(1)
    logits = np.where(chosen, sims.astype(np.float64) / options.temperature, -np.inf)
    logits -= np.where(chosen.any(1, keepdims=True), logits.max(1, keepdims=True), 0.0)
    weights = np.where(chosen, np.exp(logits), 0.0)
    total = weights.sum(1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)  # [B, k]
    v = values.astype(np.float64)
    if options.k == 1 or options.mix == "mean":
        out = np.einsum("bk,bkd->bd", weights, v)
    elif options.mix == "geometric":
        logv = np.log(np.clip(v, 1e-8, None))
        out = np.exp(np.einsum("bk,bkd->bd", weights, logv))
    elif options.mix == "medoid":
        out = np.empty((b, bins))
        for i in range(b):
            idx = np.flatnonzero(chosen[i])
            if idx.size == 0:
                out[i] = v[i, 0]
                continue
            p = np.clip(v[i, idx], 1e-8, None)  # [n, 313]
            kl = (p[:, None] * (np.log(p[:, None]) - np.log(p[None]))).sum(-1)  # [n, n]: KL(p_a || p_b)
            out[i] = v[i, idx[np.argmin(kl @ weights[i, idx])]]
    else:
        raise ValueError(f"retrieval mix must be 'mean', 'geometric' or 'medoid', got {options.mix!r}")
    out /= np.clip(out.sum(1, keepdims=True), 1e-12, None)
    if options.anneal != 1.0:
        out = anneal_histograms(out, options.anneal)
    return out.astype(np.float32), best


def anneal_histograms(p: np.ndarray, anneal: float) -> np.ndarray:
    """Histograms [B, bins] -> p ** (1 / anneal), renormalised; computed in the log domain so that a small
    anneal cannot underflow every bin to zero (the largest bin becomes 1 before the normalisation)."""
    logp = np.log(np.clip(p.astype(np.float64), 1e-30, None)) / anneal
    out = np.exp(logp - logp.max(1, keepdims=True))
    return out / out.sum(1, keepdims=True)


@torch.no_grad()
def retrieve_answers(extractor: nn.Module, light: Tensor, memory, name: str | None = None,
                     capacity: int | None = None, options: RetrievalOptions = PAPER
                     ) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """retrieve_color_feature, plus what answered each query: (colour feature [B,313], best slot [B], cosine
    similarity of the query to that slot's key [B], whether the slot holds a written item [B])."""
    queries = []

    def extract(x: Tensor) -> Tensor:  # keeps the query to score the slot that answered
        q = query_features(extractor, x, options.flip)
        queries.append(q)
        return q

    c, slots = retrieve_color_feature(extract, light, memory, name=name, capacity=capacity,
                                      options=dataclasses.replace(options, flip=False))
    got = memory.get(slots.astype(np.int64), memory=name)
    query = queries[0].float().cpu().numpy()
    sims = np.einsum("bd,bd->b", query, got["keys"]).astype(np.float32)
    return c, slots, sims, got["item_ids"] >= 0


def retrieval_kl(retrieved: Tensor, own: Tensor) -> Tensor:
    """KL(retrieved || own) per image [B] in nats, float64 on the CPU: how far the memory's answer is."""
    return kl_divergence(retrieved.detach().cpu().double(), own.detach().cpu().double())


def js_divergence(p: Tensor, q: Tensor) -> Tensor:
    """Jensen-Shannon divergence of broadcastable distributions over the last dim, in nats (at most ln 2)."""
    m = 0.5 * (p + q)
    return 0.5 * (kl_divergence(p, m) + kl_divergence(q, m))


def retrieval_js(retrieved: Tensor, own: Tensor) -> Tensor:
    """Jensen-Shannon between the memory's answer and the image's own colours, per image [B], float64 on the CPU."""
    return js_divergence(retrieved.detach().cpu().double(), own.detach().cpu().double())


def collapse_warning(filled: int, capacity: int, answers: int, n_probe: int, threshold: float) -> str | None:
    """The phase-1 collapse check on its numbers; the warning to log, or None when the memory looks sound.

    A threshold too loose for the data makes every update a hit on one slot whose key drifts to the
    mean of all queries; then that slot answers everything (docs/RESULTS.md). Reported: nothing written,
    or one slot answering all of at least 8 probed training images.
    """
    if n_probe == 0 or (filled > 0 and (n_probe < 8 or answers > 1)):
        return None
    return (f"the phase-1 memory collapsed: {filled} of {capacity} slots written, {answers} slot(s) answer "
            f"{n_probe} training images; phase1.threshold {threshold:g} is probably too loose for this data "
            "(nearly every update is a hit); see launch/calibrate_threshold.py")

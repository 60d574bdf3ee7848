"""The colour feature G is conditioned on: retrieved from the memory (METHOD.md 3.4), or uniform.

The one home of test-time retrieval (phase-1 validation, the collapse check, colorize, evaluate
--retrieval all call `retrieve_color_feature`), of the uniform feature of the "without M" ablation, and
of the KL score of a retrieved feature against the image's own. `memory` is anything with the
MemoryClient `query` signature (MemoryClient, InProcessMemory). Imports pccnet only.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from pccnet.color import NUM_BINS
from pccnet.losses import kl_divergence

DEFAULT_K = 16  # first search depth; a sparsely written memory is searched deeper (x4 per round)


def uniform_color_feature(batch: int, device: torch.device | str = "cpu") -> Tensor:
    """The "without M" ablation's colour feature: the uniform distribution [B, 313], the same for every image."""
    return torch.full((batch, NUM_BINS), 1.0 / NUM_BINS, device=device)


@torch.no_grad()
def retrieve_color_feature(extractor: nn.Module, light: Tensor, memory, name: str | None = None,
                           capacity: int | None = None, k: int = DEFAULT_K) -> tuple[Tensor, np.ndarray]:
    """Network-scaled light [B,1,S,S] -> (colour feature [B,313], slot ids [B]) of the memory's best written slot.

    Slots never written still hold their random initial keys and uniform values; among the top-k we
    take the first with an item id. Queries whose top-k holds none are asked again with 4x the k (up
    to `capacity`): a sparsely written memory would otherwise answer them with a uniform value.
    """
    if capacity is not None:
        k = min(k, capacity)
    query = extractor(light).float().cpu().numpy()
    reply = memory.query(query, k=k, fields=("values", "item_ids"), memory=name)
    values, slots = _first_written(reply)
    missing = np.flatnonzero(slots < 0)
    while missing.size and capacity is not None and k < capacity:
        k = min(4 * k, capacity)
        again = memory.query(query[missing], k=k, fields=("values", "item_ids"), memory=name)
        values[missing], slots[missing] = _first_written(again)
        missing = missing[slots[missing] < 0]
    fallback = np.flatnonzero(slots < 0)  # nothing written anywhere in reach: the plain top-1
    if fallback.size:
        values[fallback], slots[fallback] = reply["values"][fallback, 0], reply["slots"][fallback, 0]
    return torch.from_numpy(values).to(light.device), slots


@torch.no_grad()
def retrieve_answers(extractor: nn.Module, light: Tensor, memory, name: str | None = None,
                     capacity: int | None = None) -> tuple[Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """retrieve_color_feature, plus what answered each query: (colour feature [B,313], slots [B], cosine
    similarity of the query to that slot's key [B], whether the slot holds a written item [B])."""
    queries = []

    def extract(x: Tensor) -> Tensor:  # keeps the query to score the slot that answered
        q = extractor(x)
        queries.append(q)
        return q

    c, slots = retrieve_color_feature(extract, light, memory, name=name, capacity=capacity)
    got = memory.get(slots.astype(np.int64), memory=name)
    query = queries[0].float().cpu().numpy()
    sims = np.einsum("bd,bd->b", query, got["keys"]).astype(np.float32)
    return c, slots, sims, got["item_ids"] >= 0


def _first_written(reply: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the value and slot of the best-ranked written slot; slot -1 where none is written."""
    written = reply["item_ids"] >= 0  # [B, k]
    pick = written.argmax(1)
    rows = np.arange(written.shape[0])
    values = reply["values"][rows, pick].copy()
    slots = np.where(written.any(1), reply["slots"][rows, pick], -1)
    return values, slots


def retrieval_kl(retrieved: Tensor, own: Tensor) -> Tensor:
    """KL(retrieved || own) per image [B] in nats, float64 on the CPU: how far the memory's answer is."""
    return kl_divergence(retrieved.detach().cpu().double(), own.detach().cpu().double())


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

"""Few-shot memories on a live server: write exemplars into a named memory, free slots, list what is written.

A memorized exemplar takes a slot of its own (an `update` with threshold 0 misses for every row): its
key from the checkpoint's extractor on the gray version (flip-averaged like the queries when
retrieval.flip is on), its value the image's 313-bin colour
distribution, its item id a digest of its pixels. A freed slot is put back to what retrieval treats as
unwritten (item id -1, the uniform value) with the largest age, so the next exemplar reuses it first.
Uses the memory client's API only; no server internals.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from pccnet.color import NUM_BINS
from trainer.images import image_to_sample
from trainer.retrieval import query_features
from trainer.shards import item_id

# Age of a freed slot: larger than any age a memory reaches in practice (one per update), so the
# update rule's "largest age" choice takes freed slots before any written one.
FREED_AGE = 1.0e9


def pixel_item_id(img: Image.Image) -> int:
    """A stable non-negative item id from an image's decoded pixels (the same photo gets the same id)."""
    rgb = np.ascontiguousarray(np.asarray(img.convert("RGB")))
    digest = hashlib.sha256(rgb.tobytes() + np.asarray(rgb.shape, np.int64).tobytes()).hexdigest()
    return item_id(f"pixels:{digest}")


def ensure_memory(client, name: str, key_dim: int, capacity: int) -> dict:
    """The memory's info, creating it with `capacity` slots when absent; ValueError when its shape does not fit."""
    info = client.info(memory=name)
    if "capacity" not in info:
        client.create(capacity=capacity, key_dim=key_dim, value_dim=NUM_BINS, memory=name)
        info = client.info(memory=name)
    if (info["key_dim"], info["value_dim"]) != (key_dim, NUM_BINS):
        raise ValueError(f"memory {name!r} has key_dim {info['key_dim']} and value_dim {info['value_dim']}; "
                         f"this checkpoint needs {key_dim} and {NUM_BINS}")
    return info


@torch.no_grad()
def memorize_images(extractor: nn.Module, client, name: str, images: Sequence[Image.Image], image_size: int,
                    item_ids: Sequence[int] | None = None, device: torch.device | str = "cpu",
                    flip: bool = False) -> np.ndarray:
    """Write RGB images into memory `name` (which must exist), one slot each; returns the slots [n].

    The key is formed as the queries that will read it (trainer.retrieval.query_features): with `flip`
    (retrieval.flip, the default), the mean of the image's and its mirror image's features. At most the
    memory's capacity per call (the server's limit for one update).
    """
    if not images:
        return np.zeros(0, np.int64)
    samples = [image_to_sample(img, image_size) for img in images]
    light = torch.stack([s["light"] for s in samples]).to(device)
    feats = torch.stack([s["color_feature"] for s in samples]).numpy()
    keys = query_features(extractor, light, flip).float().cpu().numpy()
    ids = np.asarray(item_ids if item_ids is not None else [pixel_item_id(i) for i in images], np.int64)
    # Threshold 0: no KL is below it, so every row is a miss and takes a slot of its own.
    reply = client.update(keys, feats, threshold=0.0, age_noise=0.0, item_ids=ids, memory=name)
    return reply["slots"]


def free_slots(client, name: str, slots: Sequence[int], key_dim: int, value_dim: int = NUM_BINS) -> int:
    """Reset slots to unwritten (random unit keys, uniform values, item id -1, age FREED_AGE); returns the version."""
    slots = np.asarray(slots, np.int64)
    if slots.size == 0:
        return int(client.info(memory=name)["version"])
    if len(set(slots.tolist())) != slots.size:
        raise ValueError(f"slots to free must be distinct, got {slots.tolist()}")
    # A key per slot from the slot number: deterministic, and unrelated to every exemplar's key.
    keys = np.stack([np.random.default_rng(int(s)).standard_normal(key_dim) for s in slots]).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = np.full((slots.size, value_dim), 1.0 / value_dim, np.float32)
    reply = client.put(slots, keys, values, ages=np.full(slots.size, FREED_AGE, np.float32),
                       item_ids=np.full(slots.size, -1, np.int64), memory=name)
    return int(reply["version"])


def written_slots(item_ids: np.ndarray) -> np.ndarray:
    """Slots holding an item written by a client (item id >= 0), ascending."""
    return np.flatnonzero(np.asarray(item_ids) >= 0)


@torch.no_grad()
def encode_images(extractor: nn.Module, loader, device: torch.device | str = "cpu"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every batch of an eval loader (trainer.data) -> (keys [n, dim], colour features [n, 313], item ids [n])."""
    keys, values, ids = [], [], []
    for batch in loader:
        keys.append(extractor(batch["light"].to(device)).float().cpu().numpy())
        values.append(batch["color_feature"].float().numpy())
        ids.append(batch["item_id"].numpy())
    if not keys:
        raise ValueError("no image to encode: the data pattern holds no readable sample")
    return np.concatenate(keys), np.concatenate(values), np.concatenate(ids).astype(np.int64)


def index_memory(client, name: str | None, keys: np.ndarray, values: np.ndarray, item_ids: np.ndarray,
                 chunk: int = 1024) -> int:
    """Make memory `name` hold exactly these items: slot i <- row i (age 0), every other slot freed.

    The memory must exist with room for them; ValueError naming both counts otherwise. Returns the
    number of slots written.
    """
    info = client.info(memory=name)
    capacity, n = int(info["capacity"]), keys.shape[0]
    if n > capacity:
        raise ValueError(f"{n} items do not fit memory {name or info.get('name', '')!r} of capacity {capacity}")
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        client.put(np.arange(start, stop, dtype=np.int64), keys[start:stop], values[start:stop],
                   ages=np.zeros(stop - start, np.float32), item_ids=item_ids[start:stop], memory=name)
    for start in range(n, capacity, chunk):
        free_slots(client, name, np.arange(start, min(capacity, start + chunk)), keys.shape[1], values.shape[1])
    return n

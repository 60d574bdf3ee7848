"""Pieces shared by the studio and pack tests: a tiny checkpoint and photos (the studio process: studio/launcher.py).

The checkpoint is written by the trainer's own save_checkpoint from the trainer's model builders at the
debug config's sizes, but not trained (training is tested elsewhere; what these tests check does not
depend on its quality). Its AdaIN head is drawn at random instead of zero, so the colour feature
visibly changes the output from the start, as it does in a trained model; its memory holds 8 written
slots with the colour distributions of 8 random images.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def blocky_image(rng: np.random.Generator, size: tuple[int, int] = (48, 40), cells: int = 4) -> Image.Image:
    """A smooth random colour image (w, h)."""
    small = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BILINEAR)


def tint_image(rgb: tuple[int, int, int], rng: np.random.Generator, size: tuple[int, int] = (40, 40)) -> Image.Image:
    """A photo dominated by one colour, with some texture (exemplars whose colour distributions differ)."""
    base = np.asarray(rgb, np.float32)[None, None] * rng.uniform(0.6, 1.0, (size[1], size[0], 1))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_checkpoint(out_dir: Path, seed: int = 0, image_size: int = 32, overrides: tuple[str, ...] = ()) -> Path:
    """A run folder with one checkpoint of debug-sized, untrained models (see the module docstring)."""
    from pccnet.color import NUM_BINS
    from pccnet.discriminator import PatchDiscriminator
    from pccnet.extractor import MemoryExtractor
    from trainer.checkpoint import save_checkpoint, trainable_state
    from trainer.config import load_config
    from trainer.images import image_to_sample
    from trainer.models import build_generator

    cfg = load_config(REPO / "configs" / "debug_cpu.yaml",
                      [f"run.out_dir={out_dir}", f"data.image_size={image_size}", "memory.capacity=32", *overrides])
    torch.manual_seed(seed)
    gen = build_generator(cfg.model.generator, cfg.model.sampler)
    with torch.no_grad():
        head = gen.generator.mlp[-1]
        head.weight.normal_(0.0, 0.5)
        head.bias.normal_(0.0, 0.5)
    extractor = MemoryExtractor(cfg.model.extractor)
    disc = PatchDiscriminator(cfg.model.discriminator)
    rng = np.random.default_rng(seed)
    m, dk = cfg.memory.capacity, cfg.model.extractor.dim
    keys = rng.standard_normal((m, dk)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    values = np.full((m, NUM_BINS), 1.0 / NUM_BINS, np.float32)
    item_ids = np.full(m, -1, np.int64)
    for i in range(8):
        values[i] = image_to_sample(blocky_image(rng), image_size)["color_feature"].numpy()
        item_ids[i] = 1000 + i
    memory = {"keys": keys, "values": values / values.sum(1, keepdims=True), "ages": np.zeros(m, np.float32),
              "item_ids": item_ids, "version": 8}
    models = {"generator": gen.state_dict(), "discriminator": disc.state_dict(),
              "extractor": trainable_state(extractor)}
    save_checkpoint(out_dir, 1, cfg, models, {}, [], memory, {"phase": 2, "memory_name": cfg.memory.name})
    return out_dir


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e

"""The generator+sampler module DDP wraps, built from the config's own slices.

G and the patch sampler F are trained by one loss and one optimizer, so they are one DDP module: one
forward per step computes the colorization, encodes the generated and the real ab with the shared
encoder, and samples patches. D and the memory extractor are the library's modules as they are
(`PatchDiscriminator(cfg.model.discriminator)`, `MemoryExtractor(cfg.model.extractor)`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pccnet.config import GeneratorConfig, SamplerConfig
from pccnet.generator import Generator
from pccnet.sampler import PatchSampler


class GeneratorWithSampler(nn.Module):
    """G and (when a patch loss is on) F: light, c [, real_ab] -> fake_ab [, w taps, z taps]."""

    def __init__(self, generator: Generator, sampler: PatchSampler | None) -> None:
        super().__init__()
        self.generator = generator
        # Left out entirely when both patch losses are off, so DDP never waits for its gradients.
        self.sampler = sampler

    def forward(
        self, light: Tensor, color_feature: Tensor, real_ab: Tensor | None = None,
        patch_generator: torch.Generator | None = None,
    ):
        fake_ab = self.generator(light, color_feature)  # [B, 2, H, W]
        if real_ab is None or self.sampler is None:
            return fake_ab, None, None
        feats_fake = self.generator.encode(fake_ab)
        # The ground-truth branch is a constant of the losses (z is detached): no graph for it.
        with torch.no_grad():
            feats_real = self.generator.encode(real_ab)
        w, ids = self.sampler(feats_fake, generator=patch_generator)
        with torch.no_grad():
            z, _ = self.sampler(feats_real, ids)
        return fake_ab, w, z


def build_generator(generator: GeneratorConfig, sampler: SamplerConfig | None) -> GeneratorWithSampler:
    """G, plus F when given its config (the trainer passes None when both patch losses are off)."""
    net = Generator(generator)
    return GeneratorWithSampler(net, None if sampler is None else PatchSampler(net.tap_channels, sampler))

"""Builds the PCCNet networks from the training config, and the generator+sampler module DDP wraps.

G and the patch sampler F are trained by one loss and one optimizer, so they are one DDP module: one
forward per step computes the colorization, encodes the generated and the real ab with the shared
encoder, and samples patches. D and the memory extractor are separate DDP modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pccnet.color import NUM_BINS
from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from pccnet.discriminator import PatchDiscriminator
from pccnet.extractor import MemoryExtractor
from pccnet.generator import Generator
from pccnet.sampler import PatchSampler
from trainer.config import LossConfig, ModelConfig


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


def generator_config(cfg: ModelConfig) -> GeneratorConfig:
    return GeneratorConfig(width=cfg.width, n_blocks_encoder=cfg.n_blocks_encoder,
                           n_blocks_decoder=cfg.n_blocks_decoder, antialias=cfg.antialias,
                           mlp_dim=cfg.mlp_dim, color_dim=NUM_BINS)


def extractor_config(cfg: ModelConfig) -> ExtractorConfig:
    return ExtractorConfig(backbone=cfg.extractor, dim=cfg.extractor_dim, resnet_width=cfg.extractor_width)


def build_generator(cfg: ModelConfig, loss: LossConfig | None = None) -> GeneratorWithSampler:
    """G (+ F when loss.pc or loss.ic is on; always when loss is None)."""
    generator = Generator(generator_config(cfg))
    use_sampler = loss is None or loss.pc > 0 or loss.ic > 0
    sampler = (
        PatchSampler(generator.tap_channels, SamplerConfig(num_patches=cfg.num_patches, dim=cfg.patch_dim))
        if use_sampler else None
    )
    return GeneratorWithSampler(generator, sampler)


def build_discriminator(cfg: ModelConfig) -> PatchDiscriminator:
    return PatchDiscriminator(DiscriminatorConfig(width=cfg.d_width, n_layers=cfg.d_layers, color_dim=NUM_BINS))


def build_extractor(cfg: ModelConfig) -> MemoryExtractor:
    return MemoryExtractor(extractor_config(cfg))


def uniform_color_feature(batch: int, device: torch.device) -> Tensor:
    """The "without M" ablation's colour feature: the uniform distribution, the same for every image."""
    return torch.full((batch, NUM_BINS), 1.0 / NUM_BINS, device=device)


def trainable_state(module: nn.Module) -> dict[str, Tensor]:
    """state_dict without frozen parameters (pretrained backbones come from their packages, not checkpoints)."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    return {k: v for k, v in module.state_dict().items() if k not in frozen}


def load_trainable_state(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load a trainable_state() dict; every trainable tensor must be present with the same shape."""
    frozen = {name for name, p in module.named_parameters() if not p.requires_grad}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise ValueError(f"checkpoint {what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)

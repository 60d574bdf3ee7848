"""trainer.step: one phase-1 and one phase-2 step on tiny real networks, a real Accelerator (one CPU
process) and the real in-process memory (memory.address: inproc)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from pccnet.color import NUM_BINS
from pccnet.config import DiscriminatorConfig, ExtractorConfig, GeneratorConfig, SamplerConfig
from pccnet.discriminator import PatchDiscriminator
from pccnet.extractor import MemoryExtractor
from trainer.config import LossConfig, MemoryConfig, Phase1Config
from trainer.memory import TrainerMemory
from trainer.models import build_generator
from trainer.step import StepContext, blend_features, gan_step, memory_step

SIZE, B, DIM = 16, 4, 8


@pytest.fixture(scope="module")
def acc() -> Accelerator:
    return Accelerator(cpu=True)


def batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"light": torch.rand(B, 1, SIZE, SIZE, generator=g) * 2 - 1,
            "ab": (torch.rand(B, 2, SIZE, SIZE, generator=g) - 0.5) * 0.6,
            "color_feature": torch.softmax(4 * torch.randn(B, NUM_BINS, generator=g), 1),
            "item_id": torch.arange(100, 100 + B)}


def context(acc, threshold: float = 1.5, use_memory: bool = True, **loss) -> StepContext:
    return StepContext(accelerator=acc, loss=LossConfig(**loss), use_memory=use_memory, world_size=1, seed=0,
                       phase1=Phase1Config(k=4, threshold=threshold, age_noise=0.0))


def networks(with_sampler: bool = True):
    torch.manual_seed(0)
    gen = build_generator(GeneratorConfig(width=4, n_blocks_encoder=1, n_blocks_decoder=1, mlp_dim=8),
                          SamplerConfig(num_patches=8, dim=8) if with_sampler else None)
    disc = PatchDiscriminator(DiscriminatorConfig(width=4, n_layers=2))
    opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.999))
    return gen, disc, opt_g, opt_d


def memory_parts(tmp_path):
    torch.manual_seed(0)
    extractor = MemoryExtractor(ExtractorConfig(backbone="resnet18-scratch", dim=DIM, resnet_width=1))
    memory = TrainerMemory(MemoryConfig(address="inproc", capacity=16, pipeline=False), tmp_path, rank=0)
    memory.ensure(16, DIM, NUM_BINS, seed=0)
    return extractor, torch.optim.Adam(extractor.parameters(), lr=1e-3), memory


def test_memory_step_learns_and_writes_every_miss(acc, tmp_path):
    extractor, opt, memory = memory_parts(tmp_path)
    before = copy.deepcopy(extractor.state_dict())
    scalars, timings = memory_step(context(acc, threshold=0.0), extractor, opt, batch(), memory, step=0)
    assert set(scalars) == {"loss/m", "mem/hit_rate", "mem/positive_rate", "mem/valid_queries", "mem/top1_sim"}
    assert all(np.isfinite(v) for v in scalars.values())
    # Threshold 0: no neighbour is a positive and no update a hit; every row takes a slot of its own.
    assert scalars["mem/hit_rate"] == 0.0 and scalars["mem/positive_rate"] == 0.0
    assert set(timings) == {"forward", "update_forward", "memory_rpc", "backward"} and min(timings.values()) >= 0.0
    exported = memory.export()
    assert sorted(exported["item_ids"][exported["item_ids"] >= 0].tolist()) == [100, 101, 102, 103]
    assert exported["version"] == 1 and memory.calls == {"query": 1, "update": 1}
    # The circle loss with no positive is 0 (METHOD.md 8.1): nothing moves; with positives the extractor learns.
    assert all(torch.equal(before[k], v) for k, v in extractor.state_dict().items() if k.endswith("weight"))
    # The same images again: each one's own slot (its key, its value: KL 0) is its top-1 neighbour, a
    # positive and a hit; the other images' and the unwritten uniform slots are negatives.
    scalars, _ = memory_step(context(acc, threshold=0.5), extractor, opt, batch(), memory, step=1)
    assert scalars["mem/hit_rate"] == 1.0 and scalars["mem/valid_queries"] == 1.0
    assert 0.0 < scalars["mem/positive_rate"] < 1.0 and scalars["loss/m"] > 0
    assert scalars["mem/top1_sim"] == pytest.approx(1.0, abs=1e-5)
    assert not all(torch.equal(before[k], v) for k, v in extractor.state_dict().items())
    assert memory.calls == {"query": 2, "update": 2} and memory.export()["version"] == 2
    memory.close()


def test_gan_step_updates_both_networks_and_sums_the_weighted_losses(acc):
    gen, disc, opt_g, opt_d = networks()
    g0, d0 = copy.deepcopy(gen.state_dict()), copy.deepcopy(disc.state_dict())
    ctx = context(acc)
    scalars, timings = gan_step(ctx, gen, disc, opt_g, opt_d, batch(), torch.Generator().manual_seed(1))
    assert set(timings) == {"forward", "d_step", "g_step"} and all(np.isfinite(v) for v in scalars.values())
    weights = ctx.loss
    assert scalars["loss/g"] == pytest.approx(weights.smooth * scalars["loss/smooth"] + weights.adv * scalars["loss/g_adv"]
                                              + weights.pc * scalars["loss/pc"] + weights.ic * scalars["loss/ic"],
                                              rel=1e-5)
    assert scalars["loss/pc"] > 0 and scalars["loss/ic"] > 0
    assert not torch.equal(gen.state_dict()["generator.out_conv.weight"], g0["generator.out_conv.weight"])
    assert any(not torch.equal(v, d0[k]) for k, v in disc.state_dict().items())
    assert all(p.requires_grad for p in disc.parameters())  # D frozen only for G's step


def test_gan_step_has_no_hidden_state(acc):
    """The same modules, optimizer states, batch and patch seed give the same step, bit for bit."""
    results = []
    for _ in range(2):
        gen, disc, opt_g, opt_d = networks()
        scalars, _ = gan_step(context(acc), gen, disc, opt_g, opt_d, batch(), torch.Generator().manual_seed(1))
        results.append((scalars, gen.state_dict(), disc.state_dict()))
    (s1, g1, d1), (s2, g2, d2) = results
    assert s1 == s2
    assert all(torch.equal(g1[k], g2[k]) for k in g1) and all(torch.equal(d1[k], d2[k]) for k in d1)


def test_blend_features_mixes_towards_the_batch_mean():
    c = batch()["color_feature"]
    assert torch.equal(blend_features(c, 0.0, torch.Generator().manual_seed(0)), c)
    out = blend_features(c, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, blend_features(c, 1.0, torch.Generator().manual_seed(0)))  # the seed decides
    assert torch.allclose(out.sum(1), torch.ones(B)) and (out >= 0).all()  # still distributions
    # Each row moved along the segment from its own feature to the mean: out - c = a (mean - c), 0 < a < 1.
    toward = c.mean(0, keepdim=True) - c
    a = ((out - c) * toward).sum(1) / (toward * toward).sum(1)
    assert torch.allclose(out - c, a[:, None] * toward, atol=1e-6) and ((a > 0) & (a < 1)).all()
    assert len(set(a.tolist())) == B  # a different amount for each image


def test_blend_features_towards_given_targets():
    c, t = batch()["color_feature"], batch(5)["color_feature"]
    out = blend_features(c, 1.0, torch.Generator().manual_seed(0), towards=t)
    a = torch.rand(B, 2, generator=torch.Generator().manual_seed(0))[:, 1]  # the same draws as the blend's
    assert torch.allclose(out, c + a[:, None] * (t - c), atol=1e-6)
    assert torch.allclose(out.sum(1), torch.ones(B))


def test_feature_blend_changes_what_the_step_learns(acc):
    outcomes = []
    for share in (0.0, 1.0):
        gen, disc, opt_g, opt_d = networks()
        ctx = dataclasses.replace(context(acc), feature_blend=share)
        outcomes.append(gan_step(ctx, gen, disc, opt_g, opt_d, batch(), torch.Generator().manual_seed(1))[0])
    assert outcomes[0]["d/real"] != outcomes[1]["d/real"]  # D saw the real images with other features


def test_without_patch_losses_or_memory(acc):
    gen, disc, opt_g, opt_d = networks(with_sampler=False)
    scalars, _ = gan_step(context(acc, pc=0.0, ic=0.0), gen, disc, opt_g, opt_d, batch(), None)
    assert scalars["loss/pc"] == 0.0 and scalars["loss/ic"] == 0.0
    assert scalars["loss/g"] == pytest.approx(100 * scalars["loss/smooth"] + scalars["loss/g_adv"], rel=1e-5)
    # "Without M": G and D see the uniform feature, so the batch's own colour feature changes nothing.
    outcomes = []
    for feature_seed in (1, 2):
        gen, disc, opt_g, opt_d = networks()
        b = dict(batch(), color_feature=batch(feature_seed)["color_feature"])
        outcomes.append(gan_step(context(acc, use_memory=False), gen, disc, opt_g, opt_d, b,
                                 torch.Generator().manual_seed(1))[0])
    assert outcomes[0] == outcomes[1]


def test_step_context_takes_frozen_slices(acc):
    ctx = context(acc)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.loss.pc = 2.0

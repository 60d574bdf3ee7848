"""One training step of each phase: memory_step (phase 1, METHOD.md 4) and gan_step (phase 2).

Both take modules, optimizers, a batch and the memory, and return a dict of float scalars plus the
seconds spent in each part. No hidden state: everything a step needs is an argument.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pccnet import losses
from trainer.config import LossConfig, Phase1Config
from trainer.retrieval import uniform_color_feature
from trainer.speed import as_step_input


@dataclass
class StepContext:
    """What a step needs besides modules and batch: the accelerator and config slices."""

    accelerator: object
    loss: LossConfig
    phase1: Phase1Config
    use_memory: bool
    world_size: int
    seed: int
    channels_last: bool = False  # train.channels_last: phase-2 images go in as NHWC
    feature_blend: float = 0.0  # phase2.feature_blend


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def memory_step(ctx: StepContext, extractor: nn.Module, opt: torch.optim.Optimizer, batch: dict,
                memory, step: int) -> tuple[dict[str, float], dict[str, float]]:
    """Phase 1: circle loss of the query against its top-k memory keys, then the memory update.

    The update is submitted through `memory.submit_update`: with memory.pipeline its reply is collected
    by the next step, so `mem/hit_rate` is then the previous update's (absent on a run's first step).
    phase1.update_query picks the update's keys: recomputed after the optimizer step (post_step) or
    this step's queries (pre_step, sent before the backward so it overlaps it too).
    """
    acc = ctx.accelerator
    device = acc.device
    light, target = batch["light"], batch["color_feature"]
    t0 = _sync_time(device)
    query = extractor(light)  # [B, 512] unit rows, with grad
    q_np = query.detach().float().cpu().numpy()
    target_np = target.cpu().numpy()
    t1 = time.perf_counter()
    previous = memory.take_update()  # the last step's pipelined update: lands before this query is sent
    # Top-k selection and the KL labelling stay on the server; the keys the loss needs come back with
    # the reply or from the rank's key mirror (memory.key_cache).
    reply, keys = memory.query_with_keys(q_np, ctx.phase1.k, target_np, device)  # keys [B, k, 512], constants
    # Ages advance once per update request, so N ranks age the memory N times per global step: the
    # noise, measured in those units, scales with the world size (SYSTEMS.md 1.4, hazard C3).
    update = dict(threshold=ctx.phase1.threshold, age_noise=ctx.phase1.age_noise * ctx.world_size,
                  seed=(ctx.seed * 1_000_003 + step * 1009 + acc.process_index) % (2**63),
                  item_ids=batch["item_id"].cpu().numpy())
    pre_step = ctx.phase1.update_query == "pre_step"
    if pre_step:
        memory.submit_update(q_np, target_np, **update)
    t2 = time.perf_counter()
    positive = torch.from_numpy(reply["kl"] < ctx.phase1.threshold).to(device)  # [B, k]
    sims = torch.einsum("bd,bkd->bk", query.float(), keys.float())
    loss_m = losses.circle_loss(sims, positive, gamma=ctx.loss.circle_gamma, margin=ctx.loss.circle_margin)
    loss = loss_m
    if ctx.phase1.mix_weight:
        loss_mix = losses.neighbour_mix_loss(sims, torch.from_numpy(reply["kl"]).to(device),
                                             ctx.phase1.mix_temperature)
        loss = loss_m + ctx.phase1.mix_weight * loss_mix
    opt.zero_grad(set_to_none=True)
    acc.backward(loss)
    opt.step()
    t3 = _sync_time(device)
    t4 = t3
    if not pre_step:
        with torch.no_grad():
            new_query = extractor(light).float().cpu().numpy()
        t4 = time.perf_counter()
        memory.submit_update(new_query, target_np, **update)
    t5 = time.perf_counter()
    upd = memory.take_update() if not memory.cfg.pipeline else previous
    t6 = time.perf_counter()
    valid = positive.any(1) & (~positive).any(1)
    scalars = {
        "loss/m": float(loss_m.detach()),
        **({"loss/mix": float(loss_mix.detach())} if ctx.phase1.mix_weight else {}),
        "mem/positive_rate": float(positive.float().mean()),
        "mem/valid_queries": float(valid.float().mean()),
        "mem/top1_sim": float(reply["sims"][:, 0].mean()),
    }
    if upd is not None:
        scalars["mem/hit_rate"] = float(np.mean(upd["hit"]))
    timings = {"forward": t1 - t0, "update_forward": t4 - t3, "memory_rpc": (t2 - t1) + (t5 - t4) + (t6 - t5),
               "backward": t3 - t2}
    return scalars, timings


def blend_features(c: torch.Tensor, share: float, generator: torch.Generator | None = None,
                   towards: torch.Tensor | None = None) -> torch.Tensor:
    """Each row of c, with probability `share`, moved to (1 - a) c + a t with a ~ U(0, 1), t the row of
    `towards` (default: the batch's mean feature): a convex mix of histograms, so still a distribution.
    The draws come from the CPU generator (the patch sampler's in a run), so a seed gives the same blends
    on every device, whatever the target."""
    draws = torch.rand(c.shape[0], 2, generator=generator)
    a = torch.where(draws[:, 0] < share, draws[:, 1], torch.zeros(())).to(c)
    target = c.mean(0, keepdim=True) if towards is None else towards.to(c)
    return c + a[:, None] * (target - c)


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def gan_step(ctx: StepContext, gen: nn.Module, disc: nn.Module, opt_g: torch.optim.Optimizer,
             opt_d: torch.optim.Optimizer, batch: dict, patch_generator: torch.Generator | None = None
             ) -> tuple[dict[str, float], dict[str, float]]:
    """Phase 2 (CUT order): G forward, D step on LSGAN, then G+F step on L_PC, L_IC, Huber and LSGAN.

    batch["blend_target"] [B, 313], when present, is what phase2.feature_blend moves features towards
    (the memory's answers, trainer.loop); without it, the batch's mean feature."""
    acc = ctx.accelerator
    cfg = ctx.loss
    device = acc.device
    light, real_ab = as_step_input(batch["light"], ctx.channels_last), as_step_input(batch["ab"], ctx.channels_last)
    c = batch["color_feature"] if ctx.use_memory else uniform_color_feature(light.shape[0], device)
    if ctx.use_memory and ctx.feature_blend > 0:
        c = blend_features(c, ctx.feature_blend, patch_generator, batch.get("blend_target"))
    def autocast():  # a fresh context per use: accelerate's is a one-shot generator context manager
        return acc.autocast() if acc.mixed_precision != "no" else nullcontext()
    need_patches = cfg.needs_patches
    t0 = _sync_time(device)
    with autocast():
        fake_ab, w, z = gen(light, c, real_ab if need_patches else None, patch_generator)
    t1 = _sync_time(device)

    # D step. Real and fake go through D in one forward (instance norm is per sample, so this equals
    # two calls) because DDP expects one forward per backward.
    set_requires_grad(disc, True)
    real_lab = torch.cat((light, real_ab), dim=1)
    fake_lab = torch.cat((light, fake_ab.detach().to(light.dtype)), dim=1)
    with autocast():
        logits = disc(torch.cat((real_lab, fake_lab)), torch.cat((c, c)))
    real_logits, fake_logits = logits.chunk(2)
    loss_d = losses.lsgan_d_loss(real_logits, fake_logits)
    opt_d.zero_grad(set_to_none=True)
    acc.backward(loss_d)
    opt_d.step()
    t2 = _sync_time(device)

    # G step: D frozen and used unwrapped, so its DDP reducer never waits for gradients it won't get.
    set_requires_grad(disc, False)
    with autocast():
        fake_logits_g = acc.unwrap_model(disc)(torch.cat((light, fake_ab), dim=1), c)
    loss_adv = losses.lsgan_g_loss(fake_logits_g)
    loss_smooth = losses.smooth_l1_loss(fake_ab, real_ab, delta=cfg.delta)
    loss_g = cfg.smooth * loss_smooth + cfg.adv * loss_adv
    loss_pc = loss_ic = torch.zeros((), device=device)
    if w is not None:
        if cfg.pc > 0:
            loss_pc = torch.stack([losses.patch_contrastive_loss(wl, zl, tau=cfg.tau, beta=cfg.beta)
                                   for wl, zl in zip(w, z)]).mean()
        if cfg.ic > 0:
            loss_ic = torch.stack([losses.intra_correlation_loss(wl, zl) for wl, zl in zip(w, z)]).mean()
        loss_g = loss_g + cfg.pc * loss_pc + cfg.ic * loss_ic
    opt_g.zero_grad(set_to_none=True)
    acc.backward(loss_g)
    opt_g.step()
    set_requires_grad(disc, True)
    t3 = _sync_time(device)
    scalars = {
        "loss/d": float(loss_d.detach()),
        "loss/g": float(loss_g.detach()),
        "loss/g_adv": float(loss_adv.detach()),
        "loss/smooth": float(loss_smooth.detach()),
        "loss/pc": float(loss_pc.detach()),
        "loss/ic": float(loss_ic.detach()),
        "d/real": float(real_logits.detach().float().mean()),
        "d/fake": float(fake_logits.detach().float().mean()),
    }
    timings = {"forward": t1 - t0, "d_step": t2 - t1, "g_step": t3 - t2}
    return scalars, timings


"""The training run: set up, resume, phase 1 (memory) then phase 2 (G + F + D), log, checkpoint, clean up.

One process per device, launched by accelerate, torchrun or plain python. Steps are global and count
both phases: steps [0, phase1.steps) train the memory, the rest the colorization networks. Every rank
runs the same number of steps (the train loader is an endless resampled stream), so DDP never waits on
uneven data; a failure on any rank surfaces within run.collective_timeout_s.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import (
    InitProcessGroupKwargs,
    broadcast_object_list,
    gather_object,
)
from tqdm import tqdm

from pccnet.color import NUM_BINS
from pccnet.losses import kl_divergence
from trainer import checkpoint as ckpt_io
from trainer.config import TrainConfig, config_to_dict, resume_differences, save_config
from trainer.data import make_eval_loader, make_train_loader
from trainer.memory import TrainerMemory
from trainer.models import (
    build_discriminator,
    build_extractor,
    build_generator,
    load_trainable_state,
    trainable_state,
)
from trainer.stats import JsonlWriter, Stats, TrainerMetrics, read_jsonl
from trainer.step import StepContext, gan_step, memory_step, retrieve_color_feature
from trainer.visual import plot_curves, save_sample_grid

log = logging.getLogger("trainer")


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator on CUDA when present, else N CPU processes over gloo (cpu=True must reach it)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.run.mixed_precision,
        kwargs_handlers=[
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.run.collective_timeout_s)),
        ],
    )


def _exp_decay(lr0: float, lr1: float, steps: int):
    ratio = lr1 / lr0

    def factor(t: int) -> float:
        return ratio ** (min(t, steps) / max(steps, 1))

    return factor


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def find_resume(cfg: TrainConfig, resume: str | None) -> Path | None:
    """'auto': the run's latest checkpoint or none; a path: that checkpoint (or run dir); None: fresh."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = ckpt_io.list_checkpoints(cfg.run.out_dir)
        return found[-1] if found else None
    return ckpt_io.resolve_checkpoint(resume)


def check_resume_config(saved: TrainConfig, cfg: TrainConfig, where: Path) -> list[str]:
    """Raise on a model-shape change; return the other changed keys (logged as warnings)."""
    diff = resume_differences(saved, cfg)
    if diff["shape"]:
        detail = ", ".join(f"{k}" for k in diff["shape"])
        raise ckpt_io.CheckpointError(
            f"cannot resume from {where}: these keys change the saved model's shape: {detail}. "
            "Start a new run (another run.out_dir) or restore the saved values."
        )
    return diff["other"]


class Runner:
    """Holds what the loop needs; `run()` is the readable top level."""

    def __init__(self, cfg: TrainConfig, resume: str | None) -> None:
        self.cfg = cfg
        self.acc = make_accelerator(cfg)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.out_dir = Path(cfg.run.out_dir)
        self.resume_from = find_resume(cfg, resume)
        self.memory = None
        self.metrics = None
        self.jsonl = None
        self.stats = Stats()
        self.total_steps = cfg.phase1.steps + cfg.phase2.steps
        self.start_step = 0
        self.sample_batch = None

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        np.random.seed(cfg.run.seed + self.rank)
        self.extractor = build_extractor(cfg.model)
        self.gen = build_generator(cfg.model, cfg.loss)
        self.disc = build_discriminator(cfg.model)
        self.opt_m = torch.optim.Adam([p for p in self.extractor.parameters() if p.requires_grad], lr=cfg.phase1.lr)
        betas = tuple(cfg.phase2.betas)
        self.opt_g = torch.optim.Adam(self.gen.parameters(), lr=cfg.phase2.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.phase2.lr, betas=betas)
        decay = _exp_decay(cfg.phase2.lr, cfg.phase2.lr_final, cfg.phase2.steps)
        # Not passed to accelerate.prepare: its scheduler wrapper steps once per process per step.
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, decay)
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, decay)
        resumed = self._load_checkpoint() if self.resume_from is not None else None
        self.extractor, self.gen, self.disc, self.opt_m, self.opt_g, self.opt_d = acc.prepare(
            self.extractor, self.gen, self.disc, self.opt_m, self.opt_g, self.opt_d
        )
        self.metrics = TrainerMetrics(self.rank, None if cfg.metrics.port is None else cfg.metrics.port + self.rank)
        self.memory = TrainerMemory(cfg.memory, self.out_dir, self.rank,
                                    broadcast_object=(lambda o: broadcast_object_list([o])[0]) if self.world > 1
                                    else None)
        if self.main:
            info = self.memory.ensure(cfg.memory.capacity, cfg.model.extractor_dim, NUM_BINS, cfg.run.seed)
            if resumed is not None and resumed["memory"] is not None:
                version = self.memory.restore(resumed["memory"])
                log.info("memory %r restored from %s (server version now %d)", cfg.memory.name,
                         resumed["path"], version)
            log.info("memory %r at %s: capacity %s, filled %s, backend %s", cfg.memory.name, self.memory.endpoint,
                     info.get("capacity"), info.get("filled"), info.get("backend"))
        acc.wait_for_everyone()
        self.loader = make_train_loader(cfg.data, self.rank, self.world, cfg.run.seed + 7919 * self.start_step)
        self.phase1_probe: list[torch.Tensor] = []  # a few phase-1 images, for the collapse check
        if self.main:
            self.jsonl = JsonlWriter(self.out_dir / "stats.jsonl")
        self.ctx = StepContext(accelerator=acc, loss=cfg.loss, phase1=cfg.phase1, use_memory=cfg.model.use_memory,
                               world_size=self.world, seed=cfg.run.seed)
        self.patch_rng = torch.Generator().manual_seed(cfg.run.seed * 31 + self.rank)

    def _load_checkpoint(self) -> dict:
        state = ckpt_io.load_checkpoint(self.resume_from)
        changed = check_resume_config(state["config"], self.cfg, state["path"])
        for key in changed:
            log.warning("resume: %s differs from the checkpoint's config; using the new value", key)
        models, optim = state["models"], state["optim"]
        load_trainable_state(self.extractor, models["extractor"], "extractor")
        self.disc.load_state_dict(models["discriminator"])
        gen_state = models["generator"]
        has_sampler = self.gen.sampler is not None
        if not has_sampler:
            gen_state = {k: v for k, v in gen_state.items() if not k.startswith("sampler.")}
        missing, unexpected = self.gen.load_state_dict(gen_state, strict=False)
        if unexpected or [k for k in missing if not k.startswith("sampler.")]:
            raise ckpt_io.CheckpointError(f"{state['path']}: generator keys differ: {missing[:3]} {unexpected[:3]}")
        self.opt_m.load_state_dict(optim["opt_m"])
        self.opt_d.load_state_dict(optim["opt_d"])
        saved_params = sum(len(g["params"]) for g in optim["opt_g"]["param_groups"])
        if saved_params == len(list(self.gen.parameters())):
            self.opt_g.load_state_dict(optim["opt_g"])
        else:  # the patch sampler was switched on or off: its Adam moments cannot carry over
            log.warning("resume: the generator optimizer covers a different parameter set; starting it afresh")
        self.sched_g.load_state_dict(optim["sched_g"])
        self.sched_d.load_state_dict(optim["sched_d"])
        self.start_step = int(state["meta"]["step"])
        rng = state["rng"]
        if rng is not None and len(rng) == self.world:
            ckpt_io.set_rng_state(rng[self.rank])
        elif rng is not None:
            log.warning("resume: checkpoint has RNG states of %d ranks, this run has %d; reseeding",
                        len(rng), self.world)
        if self.main:
            log.info("resuming from %s at step %d", state["path"], self.start_step)
        return state

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        # Redraw often on a terminal, rarely into a log file (each redraw is a line there).
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not self.main, dynamic_ncols=True,
                   desc="train", mininterval=0.5 if sys.stderr.isatty() else 30.0)
        last_logged: dict[str, float] = {}
        step = self.start_step
        window_t, window_images = time.perf_counter(), 0
        for step in range(self.start_step, self.total_steps):
            phase = 1 if step < cfg.phase1.steps else 2
            t0 = time.perf_counter()
            batch = _to_device(next(self.loader), self.acc.device)
            t_data = time.perf_counter() - t0
            if phase == 1:
                scalars, timings = memory_step(self.ctx, self.extractor, self.opt_m, batch, self.memory, step)
                if self.main and sum(x.shape[0] for x in self.phase1_probe) < 32:
                    self.phase1_probe.append(batch["light"][:8].detach().cpu())
            else:
                scalars, timings = gan_step(self.ctx, self.gen, self.disc, self.opt_g, self.opt_d, batch,
                                            self.patch_rng)
                self.sched_g.step()
                self.sched_d.step()
                if self.sample_batch is None:
                    self.sample_batch = {k: v[:4] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            t_step = time.perf_counter() - t0
            timings.update(data=t_data, step=t_step)
            images = batch["light"].shape[0]
            window_images += images * self.world
            for k, v in scalars.items():
                self.stats.report(k, v)
            for part, seconds in timings.items():
                self.stats.report(f"time/{part}_s", seconds)
            self.stats.report("data/corrupt", float(self.loader.n_corrupt))  # per rank; the log shows the mean
            self.metrics.corrupt.labels(self.metrics.rank).set(self.loader.n_corrupt)
            self.metrics.observe_step(images, timings, scalars)
            done = step + 1
            if done % cfg.run.log_every == 0 or done == self.total_steps or done == cfg.phase1.steps:
                now = time.perf_counter()
                rate = window_images / max(now - window_t, 1e-9)
                window_t, window_images = now, 0
                last_logged = self._log(done, phase, rate, bar)
            if phase == 1 and cfg.data.val and cfg.phase1.val_every and done % cfg.phase1.val_every == 0:
                self._log_row(done, {"val/retrieval_acc": self.retrieval_accuracy()})
            if done == cfg.phase1.steps and cfg.data.val:
                self._log_row(done, {"val/retrieval_acc": self.retrieval_accuracy()})
            if done == cfg.phase1.steps and self.main:
                self._warn_if_collapsed()
            if phase == 2 and self.main and done % cfg.run.sample_every == 0:
                self._save_samples(done)
            if done % cfg.run.checkpoint_every == 0 or done == self.total_steps:
                self.save(done)
            bar.update(1)
        bar.close()
        if self.start_step >= self.total_steps and self.total_steps > 0 and self.main:
            log.info("nothing to do: the checkpoint is at step %d of %d", self.start_step, self.total_steps)
        if self.main:
            if self.sample_batch is not None:
                self._save_samples(self.total_steps, name="final")
            rows = read_jsonl(self.out_dir / "stats.jsonl")
            curves: dict[str, list] = {}
            for row in rows:
                for k, v in row.items():
                    if k.startswith(("loss/", "mem/", "val/")) and isinstance(v, (int, float)):
                        curves.setdefault(k, []).append((row["step"], v))
            plot_curves(curves, self.out_dir / "loss_curves.png")
        return {"step": max(step + 1, self.start_step), "last": last_logged, "out_dir": str(self.out_dir)}

    def _log(self, done: int, phase: int, rate: float, bar) -> dict[str, float]:
        means = self.stats.collect(gather_object if self.world > 1 else None)
        means.update({"step": done, "phase": phase, "images_per_s": rate})
        if means.get("time/step_s", 0) > 0:
            means["time/data_share"] = means.get("time/data_s", 0.0) / means["time/step_s"]
            means["time/memory_share"] = means.get("time/memory_rpc_s", 0.0) / means["time/step_s"]
        if self.main:
            lr = self.opt_m.param_groups[0]["lr"] if phase == 1 else self.opt_g.param_groups[0]["lr"]
            means["lr"] = lr
            self.jsonl.write(means)
            shown = {k.split("/")[-1]: f"{v:.3g}" for k, v in means.items()
                     if k in ("loss/m", "mem/hit_rate", "loss/d", "loss/g", "loss/pc", "loss/smooth")}
            bar.set_postfix(phase=phase, img_s=f"{rate:.1f}", **shown, refresh=False)
        return means

    def _log_row(self, done: int, row: dict[str, float]) -> None:
        if self.main:
            self.jsonl.write(dict(row, step=done))
            log.info("step %d: %s", done, ", ".join(f"{k} {v:.4f}" for k, v in row.items()))

    @torch.no_grad()
    def _retrieve(self, light: torch.Tensor, memory) -> tuple[torch.Tensor, np.ndarray]:
        """Test-time retrieval with the unwrapped extractor in eval mode (training mode restored)."""
        extractor = self.acc.unwrap_model(self.extractor)
        was_training = extractor.training
        extractor.eval()
        try:
            return retrieve_color_feature(extractor, light.to(self.acc.device), memory,
                                          capacity=self.cfg.memory.capacity)
        finally:
            extractor.train(was_training)

    def _warn_if_collapsed(self) -> None:
        """A threshold too loose for the data makes every update a hit on one slot whose key drifts to the
        mean of all queries; then that slot answers everything (docs/RESULTS.md). Checked on up to 32
        phase-1 images: nothing written, or one slot answering all of them, is reported."""
        if not self.phase1_probe:
            return
        probe = torch.cat(self.phase1_probe)
        info = self.memory.info()
        filled, capacity = int(info.get("filled", 0)), int(info.get("capacity", 0))
        # On the bare client: run_summary's per-rank counts stay those of training.
        answers = len(np.unique(self._retrieve(probe, self.memory.client)[1])) if filled else 0
        if filled == 0 or (probe.shape[0] >= 8 and answers == 1):
            log.warning("the phase-1 memory collapsed: %d of %d slots written, %d slot(s) answer %d training "
                        "images; phase1.threshold %g is probably too loose for this data (nearly every update "
                        "is a hit); see launch/calibrate_threshold.py", filled, capacity, answers,
                        probe.shape[0], self.cfg.phase1.threshold)

    @torch.no_grad()
    def retrieval_accuracy(self) -> float:
        """Share of data.val images whose retrieved value (as at test time) is within the KL threshold of their own."""
        hits = total = 0
        for batch in make_eval_loader(self.cfg.data.val, self.cfg.data, self.rank, self.world):
            c, _ = self._retrieve(batch["light"], self.memory)
            kl = kl_divergence(c.cpu().double(), batch["color_feature"].double())
            hits += int((kl < self.cfg.phase1.threshold).sum())
            total += c.shape[0]
        if self.world > 1:
            parts = gather_object([(hits, total)])
            hits, total = sum(p[0] for p in parts), sum(p[1] for p in parts)
        return hits / total if total else float("nan")

    def _save_samples(self, done: int, name: str | None = None) -> None:
        gen = self.acc.unwrap_model(self.gen).generator
        b = self.sample_batch
        was_training = gen.training
        gen.eval()
        with torch.no_grad():
            c = b["color_feature"] if self.cfg.model.use_memory else torch.full_like(b["color_feature"], 1 / NUM_BINS)
            fake = gen(b["light"], c)
        gen.train(was_training)
        save_sample_grid(self.out_dir / "samples" / f"{name or f'step-{done:07d}'}.png", b["light"], fake, b["ab"])

    def ddp_max_param_diff(self) -> float:
        """Largest |difference| of any parameter between this rank and rank 0 (NVlabs-style check)."""
        if self.world == 1:
            return 0.0
        worst = torch.zeros((), device=self.acc.device)
        for module in (self.extractor, self.gen, self.disc):
            for p in self.acc.unwrap_model(module).parameters():
                ref = p.detach().clone()
                torch.distributed.broadcast(ref, src=0)
                worst = torch.maximum(worst, (p.detach() - ref).abs().max())
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        return float(worst)

    def write_summary(self, result: dict[str, Any]) -> None:
        """run_summary.json: per-rank memory traffic, DDP consistency, where the run started and ended."""
        mine = {"rank": self.rank, "pid": os.getpid(), "memory_queries": self.memory.calls["query"],
                "memory_updates": self.memory.calls["update"]}
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        diff = self.ddp_max_param_diff()
        if self.main:
            summary = dict(result, ranks=ranks, ddp_max_param_diff=diff, world_size=self.world,
                           start_step=self.start_step, resumed_from=str(self.resume_from) if self.resume_from else None)
            (self.out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))

    def save(self, done: int) -> None:
        """Checkpoint at global step `done`: all ranks' updates for it have landed (barrier) first."""
        t0 = time.perf_counter()
        acc = self.acc
        acc.wait_for_everyone()
        rng = gather_object([ckpt_io.rng_state()]) if self.world > 1 else [ckpt_io.rng_state()]
        if self.main:
            memory_state = self.memory.export()
            models = {
                "generator": acc.unwrap_model(self.gen).state_dict(),
                "discriminator": acc.unwrap_model(self.disc).state_dict(),
                "extractor": trainable_state(acc.unwrap_model(self.extractor)),
            }
            optim = {"opt_m": self.opt_m.state_dict(), "opt_g": self.opt_g.state_dict(),
                     "opt_d": self.opt_d.state_dict(), "sched_g": self.sched_g.state_dict(),
                     "sched_d": self.sched_d.state_dict()}
            meta = {"phase": 1 if done <= self.cfg.phase1.steps else 2, "world_size": self.world,
                    "writer_rank": self.rank, "writer_pid": os.getpid(),
                    "memory_version": int(memory_state["version"]), "memory_name": self.cfg.memory.name,
                    "phase1_steps": self.cfg.phase1.steps, "phase2_steps": self.cfg.phase2.steps}
            path = ckpt_io.save_checkpoint(self.out_dir, done, self.cfg, models, optim, rng, memory_state, meta,
                                           keep=self.cfg.run.keep_checkpoints)
            log.info("checkpoint %s (memory version %d)", path, meta["memory_version"])
        acc.wait_for_everyone()
        self.metrics.observe_checkpoint(time.perf_counter() - t0)

    def close(self) -> None:
        for closer in (getattr(self, "loader", None), self.memory, self.metrics, self.jsonl):
            if closer is not None:
                try:
                    closer.close()
                except Exception:  # cleanup must reach every resource
                    log.exception("error while closing %r", closer)


def run(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train both phases as configured; returns the final step and the last logged means."""
    runner = Runner(cfg, resume)
    level = logging.INFO if runner.main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {runner.rank}] %(name)s: %(message)s")
    if runner.main:
        log.info("world size %d, device %s, config %s", runner.world, runner.acc.device,
                 {k: v for k, v in config_to_dict(cfg).items() if k in ("data", "model")})
    try:
        runner.setup()
        result = runner.run()
        runner.write_summary(result)
        return result
    finally:
        runner.close()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


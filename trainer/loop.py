"""The training run: set up, resume, phase 1 (memory) then phase 2 (G + F + D), log, checkpoint, clean up.

One process per device, launched by accelerate, torchrun or plain python. Steps are global and count
both phases: steps [0, phase1.steps) train the memory, the rest the colorization networks. Every rank
runs the same number of steps (the train loader is an endless resampled stream), so DDP never waits on
uneven data; a failure on any rank surfaces within run.collective_timeout_s. What a checkpoint holds
and how it is read back is trainer.checkpoint's; retrieval is trainer.retrieval's.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object
from tqdm import tqdm

from pccnet.color import NUM_BINS
from pccnet.discriminator import PatchDiscriminator
from pccnet.extractor import MemoryExtractor
from trainer import checkpoint as ckpt_io
from trainer import speed
from trainer.calibrate import resolve_capacity, resolve_threshold
from trainer.config import ConfigError, Phase2Config, TrainConfig, config_to_dict, load_config, save_config
from trainer.data import DataError, expand_pattern, make_eval_loader, make_train_loader
from trainer.distributed import check_ddp_consistency, make_accelerator, max_param_diff
from trainer.memory import TrainerMemory
from trainer.models import build_generator
from trainer.retrieval import (
    PAPER,
    RetrievalOptions,
    collapse_warning,
    retrieval_js,
    retrieval_kl,
    uniform_color_feature,
)
from trainer.stats import JsonlWriter, Stats, TrainerMetrics
from trainer.step import StepContext, gan_step, memory_step
from trainer.visual import plot_run_curves, save_sample_grid

log = logging.getLogger("trainer")

PROBE_IMAGES = 32  # phase-1 training images kept for the collapse check


def lr_decay(phase2: Phase2Config):
    """LambdaLR factor of phase-2 step t: exponential from phase2.lr to phase2.lr_final, then flat."""
    ratio, steps = phase2.lr_final / phase2.lr, phase2.steps

    def factor(t: int) -> float:
        return ratio ** (min(t, steps) / max(steps, 1))

    return factor


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class Runner:
    """Holds what the loop needs; `run()` is the readable top level."""

    def __init__(self, cfg: TrainConfig, resume: str | None) -> None:
        self.cfg = cfg
        self.acc = make_accelerator(cfg.run)
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.main = self.acc.is_main_process
        self.out_dir = Path(cfg.run.out_dir)
        self.resume_from = ckpt_io.find_resume(cfg.run.out_dir, resume)
        self.memory = None
        self.metrics = None
        self.jsonl = None
        self.stats = Stats()
        self.total_steps = cfg.phase1.steps + cfg.phase2.steps
        self.start_step = 0
        self.sample_batch = None
        self.phase1_probe: list[torch.Tensor] = []  # a few phase-1 images, for the collapse check
        self.phase1_best: dict | None = None  # phase1.patience: the best evaluation's step, JS and state

    # --- set-up -----------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, acc = self.cfg, self.acc
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.yaml")
        torch.manual_seed(cfg.run.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        np.random.seed(cfg.run.seed + self.rank)
        extractor = MemoryExtractor(cfg.model.extractor)
        gen = build_generator(cfg.model.generator, cfg.model.sampler if cfg.loss.needs_patches else None)
        disc = PatchDiscriminator(cfg.model.discriminator)
        # Weights move to the device first: a fused Adam wants its parameters where it will run.
        extractor, gen, disc = (m.to(acc.device) for m in (extractor, gen, disc))
        speed.prepare_modules(cfg.train, acc.device, gen, disc)
        adam = speed.adam_options(cfg.train, acc.device)
        opt_m = torch.optim.Adam(extractor.parameter_groups(cfg.phase1.lr, cfg.phase1.backbone_lr_scale), **adam)
        betas = tuple(cfg.phase2.betas)
        opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.phase2.lr, betas=betas, **adam)
        opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.phase2.lr, betas=betas, **adam)
        # Not passed to accelerate.prepare: its scheduler wrapper steps once per process per step.
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_decay(cfg.phase2))
        self.sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_decay(cfg.phase2))
        resumed = None
        if self.resume_from is not None:
            resumed = self._resume(ckpt_io.TrainingParts(extractor, gen, disc, opt_m, opt_g, opt_d, self.sched_g,
                                                         self.sched_d))
        self.extractor, self.gen, self.disc, self.opt_m, self.opt_g, self.opt_d = acc.prepare(
            extractor, gen, disc, opt_m, opt_g, opt_d
        )
        self.metrics = TrainerMetrics(self.rank, None if cfg.metrics.port is None else cfg.metrics.port + self.rank)
        self._open_memory(resumed)
        acc.wait_for_everyone()
        self.loader = make_train_loader(cfg.data, self.rank, self.world, cfg.run.seed + 7919 * self.start_step)
        if self.main:
            self.jsonl = JsonlWriter(self.out_dir / "stats.jsonl")
        self.ctx = StepContext(accelerator=acc, loss=cfg.loss, phase1=cfg.phase1, use_memory=cfg.model.use_memory,
                               world_size=self.world, seed=cfg.run.seed, channels_last=cfg.train.channels_last,
                               feature_blend=cfg.phase2.feature_blend)
        self.patch_rng = torch.Generator().manual_seed(cfg.run.seed * 31 + self.rank)
        # phase2.feature_blend_towards: retrieved: each phase-2 batch asks the memory for its blend targets.
        self.blend_retrieved = (cfg.model.use_memory and cfg.phase2.feature_blend > 0
                                and cfg.phase2.feature_blend_towards == "retrieved")
        self.threads = {2: torch.get_num_threads()}
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.threads[1] = speed.phase1_threads(cfg.train, cfg.data.workers, local_world, acc.device) or self.threads[2]
        if self.threads[1] != self.threads[2]:
            log.info("phase 1 on %d CPU thread(s), phase 2 on %d (train.phase1_cpu_threads=%s, data.workers=%d)",
                     self.threads[1], self.threads[2], cfg.train.phase1_cpu_threads, cfg.data.workers)

    def _resume(self, parts: ckpt_io.TrainingParts) -> dict:
        state = ckpt_io.load_checkpoint(self.resume_from)
        for key in ckpt_io.check_resume_config(state["config"], self.cfg, state["path"]):
            log.warning("resume: %s differs from the checkpoint's config; using the new value", key)
        self.start_step = ckpt_io.restore_training(parts, state, self.rank, self.world)
        if self.main:
            log.info("resuming from %s at step %d", state["path"], self.start_step)
        return state

    def _open_memory(self, resumed: dict | None) -> None:
        cfg = self.cfg
        self.memory = TrainerMemory(cfg.memory, self.out_dir, self.rank,
                                    broadcast_object=(lambda o: broadcast_object_list([o])[0]) if self.world > 1
                                    else None)
        if not self.main:
            return
        info = self.memory.ensure(cfg.memory.capacity, cfg.model.extractor.dim, NUM_BINS, cfg.run.seed)
        if resumed is not None and resumed["memory"] is not None:
            version = self.memory.restore(resumed["memory"])
            log.info("memory %r restored from %s (server version now %d)", cfg.memory.name, resumed["path"], version)
            info = self.memory.info()  # what the restore left, not the empty memory ensure() found
        log.info("memory %r at %s: capacity %s, filled %s, backend %s", cfg.memory.name, self.memory.endpoint,
                 info.get("capacity"), info.get("filled"), info.get("backend"))

    # --- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        # Redraw often on a terminal, rarely into a log file (each redraw is a line there).
        bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not self.main, dynamic_ncols=True,
                   desc="train", mininterval=0.5 if sys.stderr.isatty() else 30.0)
        self.last_logged: dict[str, float] = {}
        self.window = [time.perf_counter(), 0]  # start of the log interval, images seen in it (all ranks)
        done = self.start_step  # steps finished, so a resume with nothing left reports where it stands
        while done < self.total_steps:
            phase = 1 if done < self.cfg.phase1.steps else 2
            if torch.get_num_threads() != self.threads[phase]:
                torch.set_num_threads(self.threads[phase])
            self.train_step(done, phase)
            after = self.after_step(done + 1, phase, bar)  # > done + 1 when the stopping rule ends phase 1
            bar.update(after - done)
            done = after
        bar.close()
        if self.start_step >= self.total_steps and self.total_steps > 0 and self.main:
            log.info("nothing to do: the checkpoint is at step %d of %d", self.start_step, self.total_steps)
        if self.main:
            if self.sample_batch is not None:
                self._save_samples(self.total_steps, name="final")
            plot_run_curves(self.out_dir / "stats.jsonl", self.out_dir / "loss_curves.png")
        return {"step": done, "last": self.last_logged, "out_dir": str(self.out_dir)}

    def train_step(self, step: int, phase: int) -> None:
        """One step of the phase, its scalars and timings reported to the stats and metrics."""
        t0 = time.perf_counter()
        batch = _to_device(next(self.loader), self.acc.device)
        t_data = time.perf_counter() - t0
        if phase == 1:
            scalars, timings = memory_step(self.ctx, self.extractor, self.opt_m, batch, self.memory, step)
            if step + 1 == self.cfg.phase1.steps:  # phase 1's last pipelined update: its hits belong here
                last = self.memory.take_update()
                if last is not None:
                    self.stats.report("mem/hit_rate", float(np.mean(last["hit"])))
            if self.main and sum(x.shape[0] for x in self.phase1_probe) < PROBE_IMAGES:
                self.phase1_probe.append(batch["light"][:8].detach().cpu())
        else:
            t_retrieve = time.perf_counter()
            if self.blend_retrieved:
                batch["blend_target"] = self._blend_targets(batch)
            t_retrieve = time.perf_counter() - t_retrieve
            scalars, timings = gan_step(self.ctx, self.gen, self.disc, self.opt_g, self.opt_d, batch, self.patch_rng)
            if self.blend_retrieved:
                timings["retrieve"] = t_retrieve
            self.sched_g.step()
            self.sched_d.step()
            if self.sample_batch is None:
                self.sample_batch = {k: v[:4] for k, v in batch.items() if isinstance(v, torch.Tensor)}
        timings.update(data=t_data, step=time.perf_counter() - t0)
        images = batch["light"].shape[0]
        self.window[1] += images * self.world
        for k, v in scalars.items():
            self.stats.report(k, v)
        for part, seconds in timings.items():
            self.stats.report(f"time/{part}_s", seconds)
        self.stats.report("data/corrupt", float(self.loader.n_corrupt))  # per rank; the log shows the mean
        self.metrics.corrupt.labels(self.metrics.rank).set(self.loader.n_corrupt)
        self.metrics.observe_step(images, timings, scalars)

    def after_step(self, done: int, phase: int, bar) -> int:
        """What falls due after `done` steps: log line, validation, stopping rule, collapse check, samples,
        checkpoint. Returns the step the run goes on from: `done`, or phase1.steps when phase 1 stopped early."""
        cfg = self.cfg
        end_of_phase1 = done == cfg.phase1.steps
        if done % cfg.run.log_every == 0 or done == self.total_steps or end_of_phase1:
            self.last_logged = self._log(done, phase, bar)
            if cfg.run.check_ddp_every_log:
                check_ddp_consistency(self._modules(), done)
        stopped = False
        if end_of_phase1 and not cfg.phase1.patience:  # under the stopping rule: after the best state is back
            self._reindex_if_asked()
        if cfg.data.val and phase == 1 and (end_of_phase1 or (cfg.phase1.val_every and
                                                              done % cfg.phase1.val_every == 0)):
            row = self.validate_retrieval()
            self._log_row(done, row)
            if cfg.phase1.patience:  # (config checks: patience needs val_every and data.val)
                stopped = self._stopping_rule(done, row["val/retrieval_js"]) and not end_of_phase1
                if stopped or end_of_phase1:
                    self._restore_best(done, stopped)
                    done, end_of_phase1 = cfg.phase1.steps, True
                    self._reindex_if_asked(log_validation=done)
        if end_of_phase1 and self.main:
            self._warn_if_collapsed()
        if phase == 2 and self.main and done % cfg.run.sample_every == 0:
            self._save_samples(done)
        if done % cfg.run.checkpoint_every == 0 or done == self.total_steps or stopped:
            self.save(done)
        return done

    def _stopping_rule(self, done: int, js: float) -> bool:
        """phase1.patience: remember the best evaluation's extractor and memory; True when the last
        `patience` evaluations found none lower."""
        best = self.phase1_best
        if best is None or js < best["js"]:
            extractor = self.acc.unwrap_model(self.extractor)
            self.phase1_best = {"js": js, "step": done, "since": 0,
                                "extractor": {k: v.detach().clone() for k, v in extractor.state_dict().items()},
                                "memory": self.memory.export() if self.main else None}
            return False
        best["since"] += 1
        return best["since"] >= self.cfg.phase1.patience

    def _restore_best(self, done: int, stopped: bool) -> None:
        """End of phase 1 under the stopping rule: the extractor and memory of the best evaluation."""
        best, self.phase1_best = self.phase1_best, None
        self.memory.take_update()  # every rank's in-flight update lands before the memory is overwritten
        self.acc.wait_for_everyone()
        if best is not None and best["step"] != done:
            self.acc.unwrap_model(self.extractor).load_state_dict(best["extractor"])
            if self.main:
                self.memory.restore(best["memory"])
                log.info("phase 1 %s after step %d: the lowest val/retrieval_js was at step %d (%.4f), whose "
                         "extractor and memory are restored; phase 2 starts at step %d",
                         f"stopped (phase1.patience={self.cfg.phase1.patience})" if stopped else "ended", done,
                         best["step"], best["js"], self.cfg.phase1.steps)
            self.acc.wait_for_everyone()

    def _reindex_if_asked(self, log_validation: int | None = None) -> None:
        if not self.cfg.phase1.reindex:
            return
        if self.main:
            self._reindex()
        self.acc.wait_for_everyone()
        if log_validation is not None:  # what phase 2 and test-time retrieval will see
            self._log_row(log_validation, self.validate_retrieval())

    def _modules(self) -> dict[str, torch.nn.Module]:
        unwrap = self.acc.unwrap_model
        return {"extractor": unwrap(self.extractor), "generator": unwrap(self.gen),
                "discriminator": unwrap(self.disc)}

    def _log(self, done: int, phase: int, bar) -> dict[str, float]:
        now = time.perf_counter()
        rate = self.window[1] / max(now - self.window[0], 1e-9)
        self.window = [now, 0]
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

    @contextmanager
    def _eval_extractor(self):
        """The unwrapped extractor in eval mode, as at test time (its training mode restored after)."""
        extractor = self.acc.unwrap_model(self.extractor)
        was_training = extractor.training
        extractor.eval()
        try:
            yield extractor
        finally:
            extractor.train(was_training)

    @torch.no_grad()
    def _reindex(self) -> None:
        """phase1.reindex: the memory rebuilt from every training image, keyed by the final extractor."""
        from trainer.exemplars import encode_images, index_memory

        with self._eval_extractor() as extractor:
            keys, values, ids = encode_images(extractor, make_eval_loader(self.cfg.data.train, self.cfg.data, 0, 1),
                                              self.acc.device)
        written = index_memory(self.memory.client, None, keys, values, ids)
        log.info("phase1.reindex: %d training images written with the final extractor (%d of %d slots; "
                 "the rest freed)", keys.shape[0], written, self.cfg.memory.capacity)

    @torch.no_grad()
    def _warn_if_collapsed(self) -> None:
        """Retrieve for up to 32 phase-1 images; warn when nothing was written or one slot answers them all."""
        if not self.phase1_probe:
            return
        probe = torch.cat(self.phase1_probe)
        info = self.memory.info()
        filled, capacity = int(info.get("filled", 0)), int(info.get("capacity", 0))
        answers = 0
        if filled:
            with self._eval_extractor() as extractor:
                answers = len(np.unique(self.memory.retrieve(extractor, probe.to(self.acc.device))[1]))
        warning = collapse_warning(filled, capacity, answers, probe.shape[0], self.cfg.phase1.threshold)
        if warning:
            log.warning(warning)

    @torch.no_grad()
    def _blend_targets(self, batch: dict) -> torch.Tensor:
        """phase2.feature_blend_towards: retrieved. Each training image's answer from the phase-1 memory by
        the test-time retrieval options, leaving out the slot it wrote itself (its item id): otherwise it
        would get its own colours back, not the vaguer answer an unseen image gets."""
        with self._eval_extractor() as extractor:
            c, _ = self.memory.retrieve(extractor, batch["light"], RetrievalOptions.of(self.cfg.retrieval),
                                        exclude_ids=batch["item_id"].cpu().numpy())
        return c

    @torch.no_grad()
    def validate_retrieval(self) -> dict[str, float]:
        """Phase 1's validation on data.val (the same figures on every rank):

        - `val/retrieval_acc`: share of images whose nearest written slot's value is within the KL
          threshold of their own. Always the paper's top-1, the criterion phase 1 trains for;
          KL(retrieved || own) penalises the broad blend of `retrieval.k` > 1 values although that blend
          colours better (docs/RESULTS.md).
        - `val/retrieval_js`: mean Jensen-Shannon (nats) between the configured retrieval's answer and each
          image's own colours: what test-time colouring gets, and what the stopping rule watches.
        """
        hits = total = 0
        js_sum = 0.0
        options = RetrievalOptions.of(self.cfg.retrieval)
        with self._eval_extractor() as extractor:
            for batch in make_eval_loader(self.cfg.data.val, self.cfg.data, self.rank, self.world):
                light, own = batch["light"].to(self.acc.device), batch["color_feature"]
                c, _ = self.memory.retrieve(extractor, light, PAPER)
                hits += int((retrieval_kl(c, own) < self.cfg.phase1.threshold).sum())
                mixed = c if options == PAPER else self.memory.retrieve(extractor, light, options)[0]
                js_sum += float(retrieval_js(mixed, own).sum())
                total += c.shape[0]
        if self.world > 1:
            parts = gather_object([(hits, js_sum, total)])
            hits, js_sum, total = (sum(p[i] for p in parts) for i in range(3))
        nan = float("nan")
        return {"val/retrieval_acc": hits / total if total else nan, "val/retrieval_js": js_sum / total if total else nan}

    def _save_samples(self, done: int, name: str | None = None) -> None:
        gen = self.acc.unwrap_model(self.gen).generator
        b = self.sample_batch
        was_training = gen.training
        gen.eval()
        with torch.no_grad():
            c = b["color_feature"] if self.cfg.model.use_memory else uniform_color_feature(
                b["light"].shape[0], b["light"].device)
            fake = gen(b["light"], c)
        gen.train(was_training)
        save_sample_grid(self.out_dir / "samples" / f"{name or f'step-{done:07d}'}.png", b["light"], fake, b["ab"])

    def write_summary(self, result: dict[str, Any]) -> None:
        """run_summary.json: per-rank memory traffic, DDP consistency, where the run started and ended."""
        self.memory.take_update()  # a run that stopped mid phase 1 still counts its last update
        mine = {"rank": self.rank, "pid": os.getpid(), "memory_queries": self.memory.calls["query"],
                "memory_updates": self.memory.calls["update"], "memory_update_hits": self.memory.written["hits"],
                "memory_update_misses": self.memory.written["misses"]}
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        diff = max_param_diff(self._modules(), self.acc.device)
        if self.main:
            summary = dict(result, ranks=ranks, ddp_max_param_diff=diff, world_size=self.world,
                           start_step=self.start_step, resumed_from=str(self.resume_from) if self.resume_from else None)
            (self.out_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
        # No rank tears its process group down while another is still inside the collectives above (a rank
        # 1 once aborted with "terminate called without an active exception" on a resume with no steps).
        self.acc.wait_for_everyone()

    def save(self, done: int) -> None:
        """Checkpoint at global step `done`: all ranks' updates for it have landed (barrier) and the ranks
        agree on every parameter (a diverged model is never saved)."""
        t0 = time.perf_counter()
        acc = self.acc
        acc.wait_for_everyone()
        check_ddp_consistency(self._modules(), done)
        rng = gather_object([ckpt_io.rng_state()]) if self.world > 1 else [ckpt_io.rng_state()]
        if self.main:
            memory_state = self.memory.export()
            modules = self._modules()
            parts = ckpt_io.TrainingParts(modules["extractor"], modules["generator"], modules["discriminator"],
                                          self.opt_m, self.opt_g, self.opt_d, self.sched_g, self.sched_d)
            models, optim = parts.state_dicts()
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


def check_data_patterns(cfg: TrainConfig) -> None:
    """Every data pattern of the config names shards that exist; ConfigError naming the key and the pattern.

    Run before any process, server or step starts: a wrong data.val used to stop the run after phase 1.
    """
    if cfg.phase1.patience and cfg.phase1.steps and not cfg.data.val:
        raise ConfigError(f"phase1.patience={cfg.phase1.patience} needs data.val: the stopping rule watches the "
                          "retrieval on validation images")
    if not cfg.data.train:
        raise ConfigError("data.train must name the training shards (e.g. data/shards/x/train-{000000..000003}.tar)")
    for key, pattern in (("data.train", cfg.data.train), ("data.val", cfg.data.val)):
        if pattern is None:
            continue
        try:
            expand_pattern(pattern)
        except DataError as e:
            raise ConfigError(f"{key} {pattern!r} matches no usable shard: {e}") from e


def run(cfg: TrainConfig, resume: str | None = None) -> dict[str, Any]:
    """Train both phases as configured; returns the final step and the last logged means."""
    check_data_patterns(cfg)
    runner = Runner(cfg, resume)
    level = logging.INFO if runner.main else logging.WARNING
    logging.basicConfig(level=level, format=f"%(asctime)s [rank {runner.rank}] %(name)s: %(message)s")
    # Each "auto" becomes a number before the config is saved, so every checkpoint holds the value it used.
    runner.cfg = resolve_capacity(resolve_threshold(runner.cfg, runner.resume_from), runner.resume_from)
    if runner.main:
        log.info("world size %d, device %s, config %s", runner.world, runner.acc.device,
                 {k: v for k, v in config_to_dict(cfg).items() if k in ("data", "model")})
    try:
        runner.setup()
        result = runner.run()
        runner.write_summary(result)
    finally:
        runner.close()
        # The DDP wrappers and the Accelerator hold the gloo process group: freed only at interpreter
        # exit, its worker threads were sometimes destroyed still joinable (SIGABRT after "done").
        runner = None
        gc.collect()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return result


def train(config: str | Path | None, overrides: list[str] | tuple[str, ...] = (), resume: str | None = "auto"
          ) -> dict[str, Any]:
    """launch/train.py: the config file plus overrides, checked to name training data that exists, then run()."""
    cfg = load_config(config, overrides)
    check_data_patterns(cfg)  # a wrong pattern fails here, before any process or server starts
    result = run(cfg, resume=resume)
    if os.environ.get("RANK", "0") == "0":
        print(f"done: step {result['step']}, outputs in {result['out_dir']}")
    return result

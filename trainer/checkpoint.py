"""Checkpoints: a folder per global step, written atomically, holding everything a resume needs.

`<out_dir>/checkpoints/step-NNNNNNN/` contains models.pt (trainable weights only; frozen pretrained
backbones come from their packages), optim.pt (optimizers, schedulers), rng.pt (every rank's RNG
states), memory.npz (the memory exported at that step), config.yaml and a human-readable meta.json.
It is written under a temporary name, fsync'ed, then renamed: a crash leaves the previous one intact.
This module also owns reading one apart: which state dict goes into which module (`restore_training`,
`generator_state`), the resume checks (`find_resume`, `check_resume_config`) and the memory restore.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.config import TrainConfig, load_config, resume_differences, save_config

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7})$")
REQUIRED_FILES = ("models.pt", "optim.pt", "meta.json", "config.yaml")
# Rows per put when restoring a memory: keeps each request well under the server's message limit.
RESTORE_CHUNK = 4096


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or incompatible with the current configuration."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and all((p / f).is_file() for f in REQUIRED_FILES)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's out_dir (then its latest checkpoint)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES):
        return p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} is neither a checkpoint folder nor a run directory with checkpoints")
    return found[-1]


def find_resume(out_dir: str | Path, resume: str | None) -> Path | None:
    """'auto': the run's latest checkpoint or none; a path: that checkpoint (or run dir); None: fresh."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    return resolve_checkpoint(resume)


def check_resume_config(saved: TrainConfig, cfg: TrainConfig, where: Path) -> list[str]:
    """Raise on a model-shape change; return the other changed keys (logged as warnings)."""
    diff = resume_differences(saved, cfg)
    if diff["shape"]:
        raise CheckpointError(
            f"cannot resume from {where}: these keys change the saved model's shape: {', '.join(diff['shape'])}. "
            "Start a new run (another run.out_dir) or restore the saved values."
        )
    return diff["other"]


def _fsync(*paths: Path) -> None:
    """fsync files and folders (a folder: so the renames and creations in it are durable)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ---------------------------------------------------------------------------------------
def save_checkpoint(out_dir: str | Path, step: int, cfg: TrainConfig, models: dict[str, dict],
                    optim: dict[str, dict], rng_states: list[dict], memory_state: dict | None,
                    meta: dict[str, Any], keep: int = 0) -> Path:
    """Write step-NNNNNNN atomically (call on rank 0 only) and prune to the newest `keep` (0: keep all)."""
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    torch.save(models, tmp / "models.pt")
    torch.save(optim, tmp / "optim.pt")
    torch.save(rng_states, tmp / "rng.pt")
    if memory_state is not None:
        save_memory_state(memory_state, tmp / "memory.npz")
    save_config(cfg, tmp / "config.yaml")
    meta = dict(meta, step=step, time=time.time())
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    _fsync(*(f for f in tmp.rglob("*") if f.is_file()), tmp)
    if final.exists():  # a re-run of the same step (e.g. the final one after a resume): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(root)
    if keep > 0:
        for stale in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    # Leftovers of runs killed mid-write are never read; clear them.
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def save_memory_state(state: dict, path: str | Path) -> None:
    """A memory export as an .npz (arrays only, loadable without pickle)."""
    arrays = {k: np.asarray(state[k]) for k in ("keys", "values", "ages", "item_ids")}
    np.savez(path, version=np.int64(state.get("version", -1)), **arrays)


def load_memory_state(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in ("keys", "values", "ages", "item_ids")}
        out["version"] = int(z["version"])
    return out


# --- reading ---------------------------------------------------------------------------------------
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    training: bool = True) -> dict[str, Any]:
    """The parts of a checkpoint folder: path, models, memory, config, meta; with `training` also optim, rng."""
    ckpt = resolve_checkpoint(path)
    out: dict[str, Any] = {"path": ckpt}
    try:
        out["models"] = torch.load(ckpt / "models.pt", map_location=map_location, weights_only=True)
        if training:
            out["optim"] = torch.load(ckpt / "optim.pt", map_location=map_location, weights_only=True)
            # RNG states hold numpy/python tuples: trusted local files we wrote ourselves.
            out["rng"] = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False) \
                if (ckpt / "rng.pt").is_file() else None
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {e}") from e
    out["memory"] = load_memory_state(ckpt / "memory.npz") if (ckpt / "memory.npz").is_file() else None
    out["config"] = load_config(ckpt / "config.yaml")
    out["meta"] = json.loads((ckpt / "meta.json").read_text())
    return out


def load_for_inference(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Models, memory, config and meta of a checkpoint (no optimizer state)."""
    return load_checkpoint(path, map_location, training=False)


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
        raise CheckpointError(f"checkpoint {what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")


def generator_state(models: dict[str, dict]) -> dict[str, Tensor]:
    """G's own state dict from a checkpoint's models (saved as the G+F module: keys 'generator.*')."""
    prefix = "generator."
    return {k[len(prefix):]: v for k, v in models["generator"].items() if k.startswith(prefix)}


def restore_memory(memory, state: dict[str, np.ndarray], name: str | None = None) -> int:
    """Overwrite every slot of a memory (a client) with a checkpoint's export; returns its version after.

    The memory must exist with the export's shape. Written in chunks of RESTORE_CHUNK rows.
    """
    n = state["keys"].shape[0]
    version = -1
    for start in range(0, n, RESTORE_CHUNK):
        stop = min(n, start + RESTORE_CHUNK)
        reply = memory.put(
            np.arange(start, stop, dtype=np.int64), state["keys"][start:stop], state["values"][start:stop],
            ages=state["ages"][start:stop].astype(np.float32), item_ids=state["item_ids"][start:stop], memory=name,
        )
        version = int(reply["version"])
    return version


@dataclass
class TrainingParts:
    """What a training checkpoint holds the state of: the unwrapped modules, optimizers, schedulers."""

    extractor: nn.Module
    generator: nn.Module  # trainer.models.GeneratorWithSampler
    discriminator: nn.Module
    opt_m: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    sched_g: Any
    sched_d: Any

    def state_dicts(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """(models, optim) as save_checkpoint writes them."""
        models = {"generator": self.generator.state_dict(), "discriminator": self.discriminator.state_dict(),
                  "extractor": trainable_state(self.extractor)}
        optim = {"opt_m": self.opt_m.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "sched_g": self.sched_g.state_dict(),
                 "sched_d": self.sched_d.state_dict()}
        return models, optim


def restore_training(parts: TrainingParts, state: dict[str, Any], rank: int, world: int) -> int:
    """Load a load_checkpoint() dict into `parts` and this rank's RNG; returns the step to start at.

    The patch sampler may have been switched on or off since (a loss weight set to 0): its weights are
    then left out or kept fresh, and G's Adam state starts afresh (its parameter set changed).
    """
    models, optim = state["models"], state["optim"]
    load_trainable_state(parts.extractor, models["extractor"], "extractor")
    parts.discriminator.load_state_dict(models["discriminator"])
    gen_state = models["generator"]
    if parts.generator.sampler is None:
        gen_state = {k: v for k, v in gen_state.items() if not k.startswith("sampler.")}
    missing, unexpected = parts.generator.load_state_dict(gen_state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("sampler.")]:
        raise CheckpointError(f"{state['path']}: generator keys differ: {missing[:3]} {unexpected[:3]}")
    parts.opt_m.load_state_dict(optim["opt_m"])
    parts.opt_d.load_state_dict(optim["opt_d"])
    saved_params = sum(len(g["params"]) for g in optim["opt_g"]["param_groups"])
    if saved_params == len(list(parts.generator.parameters())):
        parts.opt_g.load_state_dict(optim["opt_g"])
    else:
        log.warning("resume: the generator optimizer covers a different parameter set; starting it afresh")
    parts.sched_g.load_state_dict(optim["sched_g"])
    parts.sched_d.load_state_dict(optim["sched_d"])
    rng = state["rng"]
    if rng is not None and len(rng) == world:
        set_rng_state(rng[rank])
    elif rng is not None:
        log.warning("resume: checkpoint has RNG states of %d ranks, this run has %d; reseeding", len(rng), world)
    return int(state["meta"]["step"])

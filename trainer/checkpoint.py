"""Checkpoints: a folder per global step, written atomically, holding everything a resume needs.

`<out_dir>/checkpoints/step-NNNNNNN/` contains models.pt (trainable weights only; frozen pretrained
backbones come from their packages), optim.pt (optimizers, schedulers), rng.pt (every rank's RNG
states), memory.npz (the memory exported at that step), config.yaml and a human-readable meta.json.
It is written under a temporary name, fsync'ed, then renamed: a crash leaves the previous one intact.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import TrainConfig, load_config, save_config
from trainer.memory import load_memory_state, save_memory_state

STEP_DIR = re.compile(r"^step-(\d{7})$")
REQUIRED_FILES = ("models.pt", "optim.pt", "meta.json", "config.yaml")


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


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
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
    _fsync_tree(tmp)
    if final.exists():  # a re-run of the same step (e.g. the final one after a resume): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    if keep > 0:
        for stale in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    # Leftovers of runs killed mid-write are never read; clear them.
    for leftover in root.glob(".tmp-*"):
        if leftover != tmp:
            shutil.rmtree(leftover, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """All parts of a checkpoint folder (models, optim, rng, memory, config, meta)."""
    ckpt = resolve_checkpoint(path)
    out: dict[str, Any] = {"path": ckpt}
    try:
        out["models"] = torch.load(ckpt / "models.pt", map_location=map_location, weights_only=True)
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
    ckpt = resolve_checkpoint(path)
    try:
        models = torch.load(ckpt / "models.pt", map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {e}") from e
    return {
        "path": ckpt,
        "models": models,
        "memory": load_memory_state(ckpt / "memory.npz") if (ckpt / "memory.npz").is_file() else None,
        "config": load_config(ckpt / "config.yaml"),
        "meta": json.loads((ckpt / "meta.json").read_text()),
    }

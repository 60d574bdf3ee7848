"""Checkpoints: a folder per global step, written atomically, holding everything a resume needs.

`<out_dir>/checkpoints/step-NNNNNNN/` contains generator.safetensors, discriminator.safetensors and
extractor.safetensors (trainable weights only; frozen pretrained backbones come from their packages),
optim.pt (optimizers, schedulers) and rng.pt (every rank's RNG states as tensors and plain numbers),
both read with `weights_only=True`, memory.npz (the memory at that step, read without pickle),
config.yaml and a human-readable meta.json. It is written under a temporary name, fsync'ed, then
renamed: a crash leaves the previous one intact. Checkpoints of earlier releases (models.pt, and an
rng.pt holding numpy arrays) still load, with nothing unpickled beyond tensors and numpy arrays.

This module is also the one loader that decides what a path is (`describe_path`): a checkpoint folder,
a run's out_dir (its latest checkpoint) or an inference bundle (launch/export.py: config, generator
and extractor weights, the memory as a pack). It owns reading them apart: which state dict goes into
which module (`restore_training`, `generator_state`), the resume checks (`find_resume`,
`check_resume_config`) and the memory restore.
"""

from __future__ import annotations

import hashlib
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
import safetensors.torch
import torch
from torch import Tensor, nn

from trainer.config import TrainConfig, load_saved_config, resume_differences, save_config

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{7})$")
CHECKPOINT_FORMAT = 2  # 1: models.pt (a pickled dict of state dicts); 2: one safetensors file per network
NETWORKS = ("generator", "discriminator", "extractor")
REQUIRED_FILES = ("optim.pt", "meta.json", "config.yaml")  # plus the weights: WEIGHT_FILES or LEGACY_MODELS
WEIGHT_FILES = tuple(f"{n}.safetensors" for n in NETWORKS)
LEGACY_MODELS = "models.pt"
# An inference bundle (trainer/bundle.py writes it): no optimizer state, the memory as a pack.
BUNDLE_FILE = "bundle.json"
BUNDLE_FORMAT = "pccnet-bundle"
BUNDLE_FILES = ("config.yaml", "generator.safetensors", "extractor.safetensors")
BUNDLE_MEMORY = "memory.pack"
# Rows per put when restoring a memory: keeps each request well under the server's message limit.
RESTORE_CHUNK = 4096


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or incompatible with the current configuration."""


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def is_checkpoint_dir(p: Path) -> bool:
    """A complete checkpoint folder of either format."""
    return (p.is_dir() and all((p / f).is_file() for f in REQUIRED_FILES)
            and (all((p / f).is_file() for f in WEIGHT_FILES) or (p / LEGACY_MODELS).is_file()))


def is_bundle_dir(p: Path) -> bool:
    return p.is_dir() and (p / BUNDLE_FILE).is_file()


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_checkpoint_dir(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def describe_path(path: str | Path) -> tuple[str, Path]:
    """What a --checkpoint value names: ('bundle', folder) or ('checkpoint', folder; a run's latest)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist")
    if is_bundle_dir(p):
        return "bundle", p
    if is_checkpoint_dir(p):
        return "checkpoint", p
    found = list_checkpoints(p)
    if not found:
        raise CheckpointError(f"{str(p)!r} is neither a checkpoint folder, a run directory with checkpoints, "
                              f"nor an exported model (a folder with {BUNDLE_FILE})")
    return "checkpoint", found[-1]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run's out_dir (then its latest checkpoint); a bundle cannot be resumed."""
    kind, p = describe_path(path)
    if kind == "bundle":
        raise CheckpointError(f"{str(p)!r} is an exported model (inference only: no optimizer state); resume "
                              "from the run's checkpoint instead")
    return p


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
    """This process's RNG states as tensors, numbers and strings only (so rng.pt loads with weights_only)."""
    version, words, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, torch.tensor(words, dtype=torch.int64), gauss],
             "numpy": [kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore rng_state() (or the tuples of format-1 checkpoints: Python's state, numpy's with an array)."""
    version, words, gauss = state["python"]
    words = tuple(int(w) for w in (words.tolist() if isinstance(words, Tensor) else words))
    random.setstate((version, words, gauss))
    kind, key, *rest = state["numpy"]
    key = key.numpy() if isinstance(key, Tensor) else np.asarray(key)
    np.random.set_state((kind, key.astype(np.uint32), *rest))
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
    for net in NETWORKS:
        save_weights(models.get(net, {}), tmp / f"{net}.safetensors", {"network": net, "step": str(step)})
    torch.save(optim, tmp / "optim.pt")
    torch.save(rng_states, tmp / "rng.pt")
    if memory_state is not None:
        save_memory_state(memory_state, tmp / "memory.npz")
    save_config(cfg, tmp / "config.yaml")
    meta = dict(meta, step=step, time=time.time(), checkpoint_format=CHECKPOINT_FORMAT)
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


def save_weights(state: dict[str, Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """A state dict as a safetensors file (CPU copies: safetensors refuses shared or strided storage)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    # Bytes written by us (save_file creates 0600 files; a bundle is meant to be shared).
    Path(path).write_bytes(safetensors.torch.save(tensors, metadata=metadata))


def load_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """A safetensors file as a state dict (no pickle); CheckpointError naming the file when unreadable."""
    try:
        state = safetensors.torch.load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error type for a damaged header or body
        raise CheckpointError(f"cannot read weights {path}: {type(e).__name__}: {e}") from e
    if str(map_location) != "cpu":
        state = {k: v.to(map_location) for k, v in state.items()}
    return state


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """torch.load with weights_only=True; numpy arrays admitted for the rng.pt of format-1 checkpoints."""
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed core to _core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location=map_location, weights_only=True)


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
    kind, ckpt = describe_path(path)
    if kind == "bundle":
        if training:
            resolve_checkpoint(ckpt)  # raises: a bundle holds no optimizer state
        return load_bundle(ckpt, map_location)
    out: dict[str, Any] = {"path": ckpt}
    try:
        if (ckpt / WEIGHT_FILES[0]).is_file():
            out["models"] = {net: load_weights(ckpt / f"{net}.safetensors", map_location) for net in NETWORKS}
        else:  # format 1
            out["models"] = _torch_load(ckpt / LEGACY_MODELS, map_location)
        if training:
            out["optim"] = _torch_load(ckpt / "optim.pt", map_location)
            out["rng"] = _torch_load(ckpt / "rng.pt", "cpu") if (ckpt / "rng.pt").is_file() else None
    except CheckpointError:
        raise
    except Exception as e:  # torch raises several types for truncated, foreign or unsafe files
        raise CheckpointError(f"cannot read checkpoint {ckpt}: {e}") from e
    out["memory"] = load_memory_state(ckpt / "memory.npz") if (ckpt / "memory.npz").is_file() else None
    out["config"] = load_saved_config(ckpt / "config.yaml")
    out["meta"] = json.loads((ckpt / "meta.json").read_text())
    return out


def load_for_inference(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Models, memory, config and meta of a checkpoint, a run's latest, or a bundle (no optimizer state)."""
    return load_checkpoint(path, map_location, training=False)


def load_bundle(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """An inference bundle as load_for_inference returns a checkpoint: every file's sha256 checked first."""
    from trainer.packs import PackError, read_pack

    try:
        info = json.loads((path / BUNDLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path / BUNDLE_FILE}: {e}") from e
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise CheckpointError(f"{path / BUNDLE_FILE} is not a {BUNDLE_FORMAT} description")
    if int(info.get("format_version", 0)) > 1:
        raise CheckpointError(f"{path} is a bundle of format version {info['format_version']}; this code reads 1")
    for name in BUNDLE_FILES:
        if not (path / name).is_file():
            raise CheckpointError(f"bundle {path} lacks {name}")
    for name, digest in dict(info.get("sha256", {})).items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or not (path / name).is_file():
            raise CheckpointError(f"bundle {path}: {BUNDLE_FILE} names a file {name!r} that it lacks")
        if file_sha256(path / name) != digest:
            raise CheckpointError(f"bundle {path}: {name} does not match its sha256 in {BUNDLE_FILE} (damaged or "
                                  "edited)")
    gen = load_weights(path / "generator.safetensors", map_location)
    out: dict[str, Any] = {
        "path": path, "bundle": info,
        # As a checkpoint holds them: G inside the G+F module (keys 'generator.*'); no discriminator.
        "models": {"generator": {f"generator.{k}": v for k, v in gen.items()}, "discriminator": {},
                   "extractor": load_weights(path / "extractor.safetensors", map_location)},
        "config": load_saved_config(path / "config.yaml"), "meta": dict(info.get("meta", {}), step=info.get("step")),
        "memory": None,
    }
    if (path / BUNDLE_MEMORY).is_file():
        try:
            pack = read_pack(path / BUNDLE_MEMORY)
        except PackError as e:
            raise CheckpointError(str(e)) from e
        out["memory"] = dict(pack.arrays(), version=-1)
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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

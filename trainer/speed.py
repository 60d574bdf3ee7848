"""The `train` config section applied: memory format, Adam's implementation, torch.compile, CUDA graphs,
phase 1's CPU threads.

None of these changes what a step computes beyond floating-point reordering (tests/test_speed.py
trains a step with each and compares it with the default); docs/PERFORMANCE.md has their measured
speed. Modules are compiled in place (`nn.Module.compile`), so state-dict keys, checkpoints and
`accelerate.unwrap_model` stay as they are.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from trainer.config import ConfigError, SpeedConfig

log = logging.getLogger(__name__)


def adam_options(opts: SpeedConfig, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for torch.optim.Adam that select its implementation."""
    if opts.optimizer == "foreach":
        return {"foreach": True}
    if opts.optimizer == "for_loop":
        return {"foreach": False}
    if opts.optimizer == "fused":
        if device.type not in ("cuda", "cpu", "mps", "xpu"):
            raise ConfigError(f"train.optimizer 'fused' is not available on device {device.type!r}")
        return {"fused": True}
    return {}


def check_device(opts: SpeedConfig, device: torch.device) -> None:
    """Options the device cannot honour are errors, never silently ignored."""
    if opts.cuda_graphs and device.type != "cuda":
        raise ConfigError(f"train.cuda_graphs needs a CUDA device, this process runs on {device.type!r}; "
                          "set train.cuda_graphs=false (train.compile works everywhere)")


def prepare_modules(opts: SpeedConfig, device: torch.device, *modules: nn.Module) -> None:
    """Channels-last weights and in-place torch.compile of each module (before accelerate wraps them)."""
    check_device(opts, device)
    for module in modules:
        if opts.channels_last:
            module.to(memory_format=torch.channels_last)
        if opts.compile or opts.cuda_graphs:
            # reduce-overhead records CUDA graphs of the static-shape phase-2 graphs and replays them.
            module.compile(mode="reduce-overhead" if opts.cuda_graphs else None)


def as_step_input(x: torch.Tensor, opts_channels_last: bool) -> torch.Tensor:
    """An image batch in the memory format the modules expect."""
    return x.contiguous(memory_format=torch.channels_last) if opts_channels_last and x.dim() == 4 else x


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def phase1_threads(opts: SpeedConfig, workers: int, local_world: int, device: torch.device) -> int | None:
    """Intra-op threads for phase 1 (train.phase1_cpu_threads), or None to leave torch's count alone.

    "auto": this rank's share of the cores minus its loader workers, at least 1. On 2 cores with 2
    workers that is 1 thread: measured 1.8x the phase-1 steps/s of torch's default 2 (docs/PERFORMANCE.md).
    """
    if device.type != "cpu":
        return None
    if opts.phase1_cpu_threads != "auto":
        return int(opts.phase1_cpu_threads)
    return max(1, usable_cores() // max(1, local_world) - workers)

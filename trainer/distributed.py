"""Process-group helpers: the Accelerator, and checks that every rank still trains the same model.

`check_ddp_consistency` compares a cheap fingerprint of every parameter (its sum and sum of squares in
float64: O(parameters), one small all_gather) across ranks, as NVlabs' training loops do; the loop calls
it at every checkpoint and, with run.check_ddp_every_log, at every log line. `max_param_diff` is the
exact (and costlier) comparison run_summary.json reports once at the end.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from torch import Tensor, nn

from trainer.config import RunConfig


class DDPDivergence(RuntimeError):
    """The ranks' parameters differ: they no longer train one model."""


def make_accelerator(run: RunConfig) -> Accelerator:
    """Accelerator on CUDA when present, else N CPU processes over gloo (cpu=True must reach it)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=run.mixed_precision,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=run.collective_timeout_s))],
    )


def _named_parameters(modules: dict[str, nn.Module]) -> list[tuple[str, Tensor]]:
    return [(f"{prefix}.{name}", p) for prefix, m in modules.items() for name, p in m.named_parameters()]


@torch.no_grad()
def param_fingerprint(modules: dict[str, nn.Module]) -> tuple[list[str], Tensor]:
    """(parameter names, [n, 2] float64 of (sum, sum of squares) per parameter) on the parameters' device."""
    named = _named_parameters(modules)
    if not named:
        return [], torch.zeros(0, 2, dtype=torch.float64)
    rows = [torch.stack((p.detach().double().sum(), p.detach().double().square().sum())) for _, p in named]
    return [n for n, _ in named], torch.nan_to_num(torch.stack(rows))


def check_ddp_consistency(modules: dict[str, nn.Module], step: int) -> None:
    """Raise DDPDivergence on every rank when any rank's fingerprint differs from rank 0's (no-op on 1 rank).

    Every rank must call it at the same step (it is a collective); the parameter names must match.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    names, mine = param_fingerprint(modules)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    for rank, theirs in enumerate(gathered[1:], start=1):
        differs = (theirs != gathered[0]).any(dim=1).nonzero().flatten().tolist()
        if differs:
            shown = ", ".join(names[i] for i in differs[:5])
            raise DDPDivergence(
                f"step {step}: rank {rank}'s parameters differ from rank 0's in {len(differs)} of {len(names)} "
                f"tensors ({shown}{', ...' if len(differs) > 5 else ''}); the ranks no longer train one model "
                "(a rank-dependent code path, a nondeterministic op, or a lost update)"
            )


@torch.no_grad()
def max_param_diff(modules: dict[str, nn.Module], device: torch.device) -> float:
    """Largest |difference| of any parameter between this rank and rank 0 (0.0 on one rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    worst = torch.zeros((), device=device)
    for _, p in _named_parameters(modules):
        ref = p.detach().clone()
        dist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach() - ref).abs().max())
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return float(worst)

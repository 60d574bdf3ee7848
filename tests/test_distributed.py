"""trainer.distributed: the parameter-fingerprint check across ranks, with 2 real processes over gloo.

Both ranks build the same model; the check passes. Then rank 1 nudges one bias by 1e-6 and both ranks
must stop with DDPDivergence naming it (every rank raises, so none is left waiting in a collective).
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from trainer.distributed import DDPDivergence, check_ddp_consistency, max_param_diff, param_fingerprint

pytestmark = [pytest.mark.integration, pytest.mark.ddp]


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        modules = {"extractor": nn.Linear(4, 3), "generator": nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))}
        result: dict = {}
        check_ddp_consistency(modules, step=1)
        result["same"] = max_param_diff(modules, torch.device("cpu"))
        if rank == 1:
            with torch.no_grad():
                modules["generator"][1].bias[0] += 1e-6
        try:
            check_ddp_consistency(modules, step=2)
            result["diverged"] = None
        except DDPDivergence as e:
            result["diverged"] = str(e)
        result["diff"] = max_param_diff(modules, torch.device("cpu"))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_a_diverged_rank_stops_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A file store: no port to pick. The children inherit this process's sys.path (tests/ included).
    ctx = mp.start_processes(_rank, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240  # generous: two fresh interpreters importing torch on a loaded machine
    try:
        while not ctx.join(timeout=5):
            assert time.monotonic() < deadline, "the two ranks did not finish"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["same"] == 0.0
        assert r["diverged"] is not None and r["diverged"].startswith("step 2: rank 1's parameters differ from rank "
                                                                      "0's in 1 of 6 tensors (generator.1.bias)")
        assert r["diff"] == pytest.approx(1e-6, rel=0.1)


def test_the_fingerprint_sees_one_changed_value():
    torch.manual_seed(0)
    modules = {"a": nn.Linear(3, 2)}
    names, before = param_fingerprint(modules)
    assert names == ["a.weight", "a.bias"] and before.shape == (2, 2) and before.dtype == torch.float64
    with torch.no_grad():
        modules["a"].weight[1, 2] *= -1  # a sign flip keeps the sum of squares but not the sum
    _, after = param_fingerprint(modules)
    assert after[0, 0] != before[0, 0] and after[0, 1] == before[0, 1] and torch.equal(after[1], before[1])
    check_ddp_consistency(modules, step=0)  # no process group: one rank, nothing to compare
    assert max_param_diff(modules, torch.device("cpu")) == 0.0
    assert os.environ.get("RANK") is None

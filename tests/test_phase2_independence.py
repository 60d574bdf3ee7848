"""Phase 2 does not read the colour memory: G and D come out bit-identical from two different memories
(the one exception, phase2.feature_blend_towards: retrieved, is tested last).

This is what lets launch/results.py re-score trained rows with a recalibrated memory instead of
retraining them (the training-time saving measured in docs/RESULTS.md). The runs train in this
process with the in-process memory (memory.address: inproc); the end-of-phase-1 collapse check is
watched on the way (a threshold every pair passes writes nothing).
"""

import json
import logging

import numpy as np
import pytest
import torch
from trainhelpers import write_tiny_shards

from trainer.checkpoint import load_checkpoint
from trainer.config import load_config
from trainer.loop import run

pytestmark = [pytest.mark.slow]

CONFIG = "configs/debug_cpu.yaml"


def _train(out, shards: str, *overrides: str, resume: str = "none") -> None:
    cfg = load_config(CONFIG, [f"data.train={shards}", f"run.out_dir={out}", "memory.address=inproc",
                               "data.workers=0", *overrides])
    run(cfg, resume=resume)


def test_phase2_weights_do_not_depend_on_the_phase1_memory(tmp_path, caplog):
    shards = write_tiny_shards(tmp_path / "shards")
    models, memories, collapsed = [], [], []
    # Every update a miss vs every update a hit (no KL reaches 100 nats): different memories.
    for threshold in (0.1, 100.0):
        p1 = tmp_path / f"p1-{threshold}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="trainer"):
            _train(p1, shards, "phase1.steps=4", f"phase1.threshold={threshold}", "phase2.steps=0",
                   "run.checkpoint_every=4")
        collapsed.append(any("memory collapsed" in r.getMessage() for r in caplog.records))
        memories.append(np.load(p1 / "checkpoints" / "step-0000004" / "memory.npz", allow_pickle=False))
        out = tmp_path / f"p2-{threshold}"
        _train(out, shards, "phase1.steps=4", "phase2.steps=3", "run.checkpoint_every=100",
               resume=str(p1 / "checkpoints" / "step-0000004"))
        models.append(load_checkpoint(out / "checkpoints" / "step-0000007")["models"])
    # threshold 0.1: all 4 x 2 rows missed and were written; 100: all hit, nothing was written (and said so).
    assert [int((m["item_ids"] >= 0).sum()) for m in memories] == [8, 0]
    assert collapsed == [False, True]
    assert not np.array_equal(memories[0]["keys"], memories[1]["keys"]), "the two memories should differ"
    for net in ("generator", "discriminator"):
        a, b = models[0][net], models[1][net]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{net}.{name} depends on the phase-1 memory"


def test_blending_towards_retrieved_answers_reads_the_memory(tmp_path):
    """phase2.feature_blend_towards: retrieved is the one phase-2 option that does read the memory: G then
    depends on which memory phase 1 left, and the step's retrieval time is logged."""
    shards = write_tiny_shards(tmp_path / "shards")
    models = []
    for threshold in (0.1, 100.0):
        p1 = tmp_path / f"p1-{threshold}"
        _train(p1, shards, "phase1.steps=4", f"phase1.threshold={threshold}", "phase2.steps=0",
               "run.checkpoint_every=4")
        out = tmp_path / f"p2-{threshold}"
        _train(out, shards, "phase1.steps=4", "phase2.steps=3", "run.checkpoint_every=100", "run.log_every=1",
               "phase2.feature_blend=1", "phase2.feature_blend_towards=retrieved",
               resume=str(p1 / "checkpoints" / "step-0000004"))
        models.append(load_checkpoint(out / "checkpoints" / "step-0000007")["models"]["generator"])
        rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
        assert any(r.get("phase") == 2 and r.get("time/retrieve_s", 0) > 0 for r in rows)
    assert any(not torch.equal(models[0][k], models[1][k]) for k in models[0])

"""Phase 2 never reads the colour memory: G and D come out bit-identical from two different memories.

This is what lets launch/results.py re-score trained rows with a recalibrated memory instead of
retraining them (the training-time saving measured in docs/RESULTS.md).
"""

import numpy as np
import pytest
import torch
from trainhelpers import PYTHON, run_cmd, write_config, write_tiny_shards

pytestmark = [pytest.mark.integration]


def test_phase2_weights_do_not_depend_on_the_phase1_memory(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards")
    models, memories = [], []
    for threshold in (0.1, 5.0):  # every update a miss vs every update a hit: different memories
        p1 = tmp_path / f"p1-{threshold}"
        cfg = write_config(tmp_path / f"p1-{threshold}.yaml", shards, p1, phase1__steps=4,
                           phase1__threshold=threshold, phase2__steps=0, run__checkpoint_every=4)
        res = run_cmd([PYTHON, "launch/train.py", "--config", str(cfg)])
        assert res.returncode == 0, res.stdout[-3000:]
        memories.append(np.load(p1 / "checkpoints" / "step-0000004" / "memory.npz"))
        out = tmp_path / f"p2-{threshold}"
        cfg = write_config(tmp_path / f"p2-{threshold}.yaml", shards, out, phase1__steps=4, phase2__steps=3,
                           run__checkpoint_every=100)
        res = run_cmd([PYTHON, "launch/train.py", "--config", str(cfg), "--resume",
                       str(p1 / "checkpoints" / "step-0000004")])
        assert res.returncode == 0, res.stdout[-3000:]
        models.append(torch.load(out / "checkpoints" / "step-0000007" / "models.pt", weights_only=True))
    assert not np.array_equal(memories[0]["keys"], memories[1]["keys"]), "the two memories should differ"
    for net in ("generator", "discriminator"):
        a, b = models[0][net], models[1][net]
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), f"{net}.{name} depends on the phase-1 memory"


def test_a_collapsed_memory_is_reported(tmp_path):
    """With a threshold no pair exceeds, every update is a hit and nothing is written: say so."""
    shards = write_tiny_shards(tmp_path / "shards")
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", phase1__steps=4, phase1__threshold=100.0,
                       phase2__steps=0, run__checkpoint_every=4)
    res = run_cmd([PYTHON, "launch/train.py", "--config", str(cfg)])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "phase1.threshold 100 is probably too loose" in res.stdout and "memory collapsed" in res.stdout
    cfg = write_config(tmp_path / "d.yaml", shards, tmp_path / "run2", phase1__steps=4, phase1__threshold=0.0,
                       phase2__steps=0, run__checkpoint_every=4)
    res = run_cmd([PYTHON, "launch/train.py", "--config", str(cfg)])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "too loose" not in res.stdout

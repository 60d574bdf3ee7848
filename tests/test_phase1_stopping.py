"""Phase 1's retrieval options (issue 14): the stopping rule on validation JS, and training the top convs
of a pretrained extractor backbone. Real tiny shards, the real embedded memory server, in this process.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from trainhelpers import write_config, write_tiny_shards

from launch.train import main as train_main
from pccnet.config import ExtractorConfig
from pccnet.extractor import MemoryExtractor
from trainer.checkpoint import load_checkpoint, trainable_state
from trainer.config import ConfigError, load_config


def test_stopping_rule_and_train_convs_are_validated(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"phase1\.patience=2 needs phase1\.val_every > 0"):
        load_config(None, ["phase1.patience=2"])
    with pytest.raises(ConfigError, match=r"patience must be >= 0 and backbone_lr_scale > 0, got 1 and 0.0"):
        load_config(None, ["phase1.patience=1", "phase1.val_every=5", "phase1.backbone_lr_scale=0"])
    with pytest.raises(ValueError, match=r"train_convs must be an int >= 0, got -1"):
        ExtractorConfig(train_convs=-1)
    with pytest.raises(ValueError, match=r"train_convs=1 needs a pretrained backbone"):
        ExtractorConfig(backbone="resnet18-scratch", train_convs=1)
    with pytest.raises(ValueError, match=r"train_convs=6: alexnet-imagenet has only 5 convs"):
        MemoryExtractor(ExtractorConfig(train_convs=6))
    # The stopping rule watches data.val: a run without it is refused before anything starts.
    shards = write_tiny_shards(tmp_path / "shards", n_shards=1)
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", phase1__val_every=1, phase1__patience=1)
    assert train_main(["--config", str(cfg)]) == 2
    assert "phase1.patience=1 needs data.val" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_convs_trains_the_top_of_the_backbone_at_a_scaled_lr():
    ext = MemoryExtractor(ExtractorConfig(train_convs=2))
    trained = {name for name, p in ext.named_parameters() if p.requires_grad}
    assert trained == {"backbone.convs.3.weight", "backbone.convs.3.bias", "backbone.convs.4.weight",
                       "backbone.convs.4.bias", "proj.weight", "proj.bias"}
    groups = ext.parameter_groups(1e-3, 0.1)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in ext.backbone.convs[3:].parameters()}
    # Saved with the head (a checkpoint of the paper's extractor holds the head alone).
    assert set(trainable_state(ext)) == trained
    assert set(trainable_state(MemoryExtractor(ExtractorConfig()))) == {"proj.weight", "proj.bias"}
    # The backbone stays in eval mode (no dropout or batch statistics) while its top trains.
    ext.train()
    assert not ext.backbone.training and ext.proj.training
    assert len(MemoryExtractor(ExtractorConfig()).parameter_groups(1e-3, 0.1)) == 1


def _rows(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


def test_stopping_rule_restores_the_best_evaluation_and_goes_on_with_phase_2(tmp_path, caplog):
    shards = write_tiny_shards(tmp_path / "shards", n_shards=2, per_shard=8)
    val = write_tiny_shards(tmp_path / "val", n_shards=1, per_shard=8, seed=3)
    run = tmp_path / "run"
    steps = 12
    cfg = write_config(tmp_path / "c.yaml", shards, run, data__val=val, data__workers=0, phase1__steps=steps,
                       phase1__val_every=1, phase1__patience=2, phase1__lr=3e-2, phase2__steps=2,
                       run__checkpoint_every=1, run__keep_checkpoints=0, run__log_every=1)
    with caplog.at_level("INFO", logger="trainer"):
        assert train_main(["--config", str(cfg)]) == 0
    rows = _rows(run)
    evals = [(r["step"], r["val/retrieval_js"]) for r in rows if "val/retrieval_js" in r]
    assert all(0 <= js <= np.log(2) + 1e-9 for _, js in evals)
    best_step, best_js = min(evals, key=lambda e: (e[1], e[0]))
    last = evals[-1][0]
    # It stopped at the first evaluation that made `patience` in a row without a new lowest JS.
    since, stop = 0, None
    low = np.inf
    for step, js in evals:
        since = 0 if js < low else since + 1
        low = min(low, js)
        if since >= 2:
            stop = step
            break
    assert stop is not None, f"this seed's JS fell at every evaluation: {evals}"
    assert last == stop < steps
    assert any(f"phase 1 stopped (phase1.patience=2) after step {stop}: the lowest val/retrieval_js was at step "
               f"{best_step}" in r.getMessage() for r in caplog.records)
    # No phase-1 step ran after the stop; phase 2 ran its full length from phase1.steps on.
    phase1_logged = [r["step"] for r in rows if r.get("phase") == 1]
    assert max(phase1_logged) == stop
    assert [r["step"] for r in rows if r.get("phase") == 2] == [steps + 1, steps + 2]
    # The checkpoint at phase1.steps holds the extractor and memory of the best evaluation, bit for bit.
    best = load_checkpoint(run / "checkpoints" / f"step-{best_step:07d}")
    at_switch = load_checkpoint(run / "checkpoints" / f"step-{steps:07d}")
    for name, tensor in best["models"]["extractor"].items():
        assert torch.equal(tensor, at_switch["models"]["extractor"][name]), name
    for field in ("keys", "values", "ages", "item_ids"):
        np.testing.assert_array_equal(best["memory"][field], at_switch["memory"][field])
    assert not (run / "checkpoints" / f"step-{stop + 1:07d}").exists()


def test_neighbour_mix_loss_bounds_the_mixed_answers_kl_and_pulls_towards_close_values():
    from pccnet.losses import kl_divergence, neighbour_mix_loss

    g = torch.Generator().manual_seed(0)
    own = torch.softmax(torch.randn(4, 1, 313, generator=g, dtype=torch.float64), -1)
    values = torch.softmax(torch.randn(4, 16, 313, generator=g, dtype=torch.float64), -1)
    sims = torch.rand(4, 16, generator=g, dtype=torch.float64).requires_grad_(True)
    kl = kl_divergence(values, own)  # [4, 16], KL(value_j || own)
    loss = neighbour_mix_loss(sims, kl, temperature=0.1)
    w = torch.softmax(sims.detach() / 0.1, 1)
    mixed = (w[..., None] * values).sum(1, keepdim=True)
    # Joint convexity of KL: the loss is an upper bound on what the mixed answer scores.
    assert float(loss.detach()) >= float(kl_divergence(mixed, own).mean())
    loss.backward()
    # Gradient descent raises the similarity of the closest value and lowers that of the farthest.
    best, worst = kl.argmin(1), kl.argmax(1)
    rows = torch.arange(4)
    assert (sims.grad[rows, best] < 0).all() and (sims.grad[rows, worst] > 0).all()
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        neighbour_mix_loss(sims, kl, temperature=0)
    with pytest.raises(ConfigError, match=r"mix_weight must be >= 0 and mix_temperature > 0, got -1.0"):
        load_config(None, ["phase1.mix_weight=-1"])


def test_mix_loss_trains_and_is_logged(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n_shards=1)
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, run, data__workers=0, phase1__steps=3, phase1__mix_weight=5.0,
                       phase2__steps=0, run__log_every=1)
    assert train_main(["--config", str(cfg)]) == 0
    mix = [r["loss/mix"] for r in _rows(run) if "loss/mix" in r]
    assert len(mix) == 3 and all(np.isfinite(m) and m >= 0 for m in mix)

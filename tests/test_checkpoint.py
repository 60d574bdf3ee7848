"""trainer.checkpoint: atomic write, pruning, torn checkpoints ignored, reading one back apart, resume checks,
the memory restore, and the learning-rate schedule across a resume. Tiny tensors, no processes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from memory_server.local import InProcessMemory
from pccnet.color import NUM_BINS
from pccnet.config import ExtractorConfig, GeneratorConfig, SamplerConfig
from pccnet.discriminator import PatchDiscriminator
from pccnet.extractor import MemoryExtractor
from trainer.checkpoint import (
    CheckpointError,
    TrainingParts,
    check_resume_config,
    find_resume,
    generator_state,
    list_checkpoints,
    load_checkpoint,
    load_for_inference,
    restore_memory,
    restore_training,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from trainer.config import load_config
from trainer.loop import lr_decay
from trainer.models import build_generator

CFG = load_config("configs/debug_cpu.yaml", ["model.extractor.resnet_width=1", "model.extractor.dim=8"])


def write(out_dir, step: int, keep: int = 0, memory: dict | None = None):
    models = {"generator": {"w": torch.full((2,), float(step))}, "discriminator": {}, "extractor": {}}
    return save_checkpoint(out_dir, step, CFG, models, {"opt": {"step": step}}, [rng_state()], memory,
                           {"phase": 1}, keep=keep)


def test_save_is_complete_and_readable(tmp_path):
    memory = {"keys": np.ones((3, 8), np.float32), "values": np.full((3, NUM_BINS), 1 / NUM_BINS, np.float32),
              "ages": np.arange(3, dtype=np.float32), "item_ids": np.array([-1, 5, 7]), "version": 9}
    path = write(tmp_path, 12, memory=memory)
    assert path.name == "step-0000012"
    assert sorted(p.name for p in path.iterdir()) == ["config.yaml", "discriminator.safetensors",
                                                      "extractor.safetensors", "generator.safetensors",
                                                      "memory.npz", "meta.json", "optim.pt", "rng.pt"]
    state = load_checkpoint(tmp_path)  # the run dir: its latest checkpoint
    assert state["path"] == path and state["meta"]["step"] == 12 and state["meta"]["phase"] == 1
    assert state["config"] == CFG and state["optim"] == {"opt": {"step": 12}} and len(state["rng"]) == 1
    assert torch.equal(state["models"]["generator"]["w"], torch.full((2,), 12.0))
    assert state["memory"]["version"] == 9 and state["memory"]["item_ids"].tolist() == [-1, 5, 7]
    lean = load_for_inference(path)
    assert "optim" not in lean and "rng" not in lean and lean["config"] == CFG


def test_pruning_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        write(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000004", "step-0000005"]
    write(tmp_path, 6, keep=0)  # 0 keeps all
    assert len(list_checkpoints(tmp_path)) == 3


def test_rewriting_a_step_replaces_it_atomically(tmp_path):
    first = write(tmp_path, 7)
    (first / "stale.txt").write_text("from the first write")
    again = write(tmp_path, 7)
    assert again == first and not (again / "stale.txt").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000007"]  # no .old-/.tmp- left


def test_torn_checkpoints_are_ignored_and_cleared(tmp_path):
    write(tmp_path, 3)
    root = tmp_path / "checkpoints"
    # A write killed before its rename, and a step folder missing its meta.json (torn by hand).
    (root / f".tmp-step-0000009-{os.getpid() + 1}").mkdir()
    torn = root / "step-0000008"
    torn.mkdir()
    (torn / "generator.safetensors").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003"]
    assert find_resume(tmp_path, "auto").name == "step-0000003"
    write(tmp_path, 4)
    assert not list(root.glob(".tmp-*"))  # leftovers of killed writes are cleared by the next save


@pytest.mark.parametrize("name", ["generator.safetensors", "optim.pt", "rng.pt"])
def test_a_truncated_file_is_a_checkpoint_error(tmp_path, name):
    path = write(tmp_path, 2)
    data = (path / name).read_bytes()
    (path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cannot read .*step-0000002"):
        load_checkpoint(path)


class _Boom:
    """Any class a pickle names: torch.save writes it, and a weights-only load must refuse it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_nothing_but_tensors_and_numbers_is_unpickled(tmp_path):
    path = write(tmp_path, 2)
    # The weights are safetensors files (no pickle at all); optim.pt and rng.pt are read weights-only.
    with open(path / "generator.safetensors", "rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert b'"w"' in header and b"pickle" not in header
    torch.save({"opt": _Boom()}, path / "optim.pt")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert load_checkpoint(path, training=False)["models"]["generator"]["w"].tolist() == [2.0, 2.0]


def test_the_rng_state_is_plain_and_round_trips(tmp_path):
    import random

    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    np.random.standard_normal()  # numpy keeps a cached Gaussian: part of the state
    path = save_checkpoint(tmp_path, 1, CFG, {}, {}, [rng_state()], None, {})
    want = (random.random(), np.random.standard_normal(), torch.rand(1).item())
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    loaded = load_checkpoint(path)["rng"][0]
    assert torch.load(path / "rng.pt", weights_only=True)  # plain: no allow-list needed
    set_rng_state(loaded)
    assert (random.random(), np.random.standard_normal(), torch.rand(1).item()) == want


def test_find_resume(tmp_path):
    assert find_resume(tmp_path, "auto") is None and find_resume(tmp_path, "none") is None
    assert find_resume(tmp_path, None) is None
    with pytest.raises(CheckpointError, match="does not exist"):
        find_resume(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="neither a checkpoint folder, a run directory"):
        find_resume(tmp_path, str(tmp_path))
    path = write(tmp_path, 5)
    assert find_resume(tmp_path, "auto") == path == find_resume(tmp_path, str(path))


def test_check_resume_config_refuses_shape_changes_and_lists_the_rest(tmp_path):
    changed = load_config("configs/debug_cpu.yaml", ["model.extractor.resnet_width=1", "model.extractor.dim=8",
                                                     "phase2.steps=50", "loss.smooth=10", "phase1.lr=0.5"])
    assert check_resume_config(CFG, changed, tmp_path) == ["loss.smooth", "phase1.lr"]
    assert check_resume_config(CFG, CFG, tmp_path) == []
    for override, key in (("model.generator.width=8", "model.generator.width"),
                          ("model.sampler.dim=4", "model.sampler.dim"), ("data.image_size=64", "data.image_size"),
                          ("memory.capacity=64", "memory.capacity")):
        other = load_config("configs/debug_cpu.yaml", ["model.extractor.resnet_width=1", "model.extractor.dim=8",
                                                       override])
        with pytest.raises(CheckpointError, match=rf"cannot resume from .*: these keys change the saved model's "
                                                  rf"shape: {key}\."):
            check_resume_config(CFG, other, tmp_path)


def _parts(with_sampler: bool = True, seed: int = 0) -> TrainingParts:
    torch.manual_seed(seed)
    extractor = MemoryExtractor(ExtractorConfig(backbone="resnet18-scratch", dim=8, resnet_width=1))
    gen = build_generator(GeneratorConfig(width=2, n_blocks_encoder=1, n_blocks_decoder=1, mlp_dim=4),
                          SamplerConfig(num_patches=4, dim=4) if with_sampler else None)
    disc = CFG.model.discriminator
    disc = PatchDiscriminator(type(disc)(width=2, n_layers=1))
    opt_m = torch.optim.Adam(extractor.parameters(), lr=1e-3)
    opt_g = torch.optim.Adam(gen.parameters(), lr=CFG.phase2.lr)
    opt_d = torch.optim.Adam(disc.parameters(), lr=CFG.phase2.lr)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lr_decay(CFG.phase2))
    sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lr_decay(CFG.phase2))
    return TrainingParts(extractor, gen, disc, opt_m, opt_g, opt_d, sched_g, sched_d)


def _take_a_step(parts: TrainingParts) -> None:
    for opt, module in ((parts.opt_g, parts.generator), (parts.opt_d, parts.discriminator),
                        (parts.opt_m, parts.extractor)):
        opt.zero_grad()
        sum(p.sum() for p in module.parameters()).backward()
        opt.step()
    parts.sched_g.step()
    parts.sched_d.step()


def test_restore_training_puts_every_state_back(tmp_path):
    saved = _parts()
    _take_a_step(saved)
    models, optim = saved.state_dicts()
    np.random.seed(3)
    save_checkpoint(tmp_path, 1, CFG, models, optim, [rng_state()], None, {})
    expected_draw = np.random.rand()
    fresh = _parts(seed=1)
    assert restore_training(fresh, load_checkpoint(tmp_path), rank=0, world=1) == 1
    assert np.random.rand() == expected_draw  # this rank's RNG state came back
    for a, b in ((saved.generator, fresh.generator), (saved.discriminator, fresh.discriminator)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert fresh.opt_g.state_dict()["state"][0]["step"] == 1 and fresh.sched_g.last_epoch == 1
    # The frozen backbone's weights are not saved: the extractor checkpoint is its trainable part only.
    assert set(models["extractor"]) == set(saved.extractor.state_dict())  # resnet18-scratch: all trainable
    assert set(generator_state(models)) == set(saved.generator.generator.state_dict())


def test_restore_training_with_the_sampler_switched_off(tmp_path, caplog):
    saved = _parts()
    _take_a_step(saved)
    models, optim = saved.state_dicts()
    save_checkpoint(tmp_path, 1, CFG, models, optim, [rng_state(), rng_state()], None, {})
    without = _parts(with_sampler=False, seed=1)
    assert restore_training(without, load_checkpoint(tmp_path), rank=0, world=1) == 1
    assert torch.equal(without.generator.generator.out_conv.weight, saved.generator.generator.out_conv.weight)
    assert without.opt_g.state_dict()["state"] == {}  # G's Adam starts afresh: its parameter set changed
    assert "different parameter set" in caplog.text and "RNG states of 2 ranks, this run has 1" in caplog.text
    broken = dict(models, generator={k: v for k, v in models["generator"].items() if "out_conv" not in k})
    save_checkpoint(tmp_path, 2, CFG, broken, optim, [rng_state()], None, {})
    with pytest.raises(CheckpointError, match="generator keys differ"):
        restore_training(_parts(), load_checkpoint(tmp_path), rank=0, world=1)


def test_the_lr_schedule_continues_across_a_resume():
    straight = _parts().sched_g
    lrs = []
    for _ in range(CFG.phase2.steps + 2):
        lrs.append(straight.get_last_lr()[0])
        straight.optimizer.step()
        straight.step()
    assert lrs[0] == CFG.phase2.lr and lrs[CFG.phase2.steps] == pytest.approx(CFG.phase2.lr_final)
    assert lrs[-1] == pytest.approx(CFG.phase2.lr_final)  # flat after the decay
    first = _parts().sched_g
    for _ in range(2):
        first.optimizer.step()
        first.step()
    resumed = _parts(seed=1).sched_g
    resumed.load_state_dict(first.state_dict())
    got = []
    for _ in range(CFG.phase2.steps):
        got.append(resumed.get_last_lr()[0])
        resumed.optimizer.step()
        resumed.step()
    assert got == pytest.approx(lrs[2:2 + CFG.phase2.steps])


def test_restore_memory_round_trips_an_export_in_chunks(monkeypatch):
    import trainer.checkpoint as ckpt

    monkeypatch.setattr(ckpt, "RESTORE_CHUNK", 3)  # 7 rows: puts of 3, 3 and 1
    source = InProcessMemory(capacity=7, key_dim=4, value_dim=NUM_BINS, seed=0)
    rng = np.random.default_rng(0)
    source.update(rng.standard_normal((5, 4)).astype(np.float32), rng.random((5, NUM_BINS)).astype(np.float32) + 0.01,
                  threshold=0.0, item_ids=np.arange(5))
    state = source.export()
    target = InProcessMemory(capacity=7, key_dim=4, value_dim=NUM_BINS, seed=1)
    assert restore_memory(target, state) == 3  # three puts on a fresh memory
    again = target.export()
    for k in ("keys", "values", "ages", "item_ids"):
        np.testing.assert_allclose(again[k], state[k], atol=1e-6)


def test_meta_is_human_readable(tmp_path):
    path = write(tmp_path, 1)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 1 and meta["phase"] == 1 and meta["time"] > 0

"""The trainer end to end: 2 real processes over gloo, real tar shards, the real memory server process.

Each test launches `torchrun --standalone --nproc_per_node 2 launch/train.py` (a free rendezvous port
each time) in its own process group, and kills the group if anything is left behind.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from trainhelpers import (
    PYTHON,
    env,
    kill_tree,
    run_cmd,
    torchrun_cmd,
    wait_for,
    write_config,
    write_tiny_shards,
)

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from trainer.checkpoint import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.ddp]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.slow
def test_two_process_run_of_both_phases(tmp_path, shards):
    out = tmp_path / "run"
    # No age noise: each miss then takes a slot never written before (the memory has room for all 12 rows).
    cfg = write_config(tmp_path / "c.yaml", shards, out, metrics__port=None, phase1__age_noise=0.0)
    res = run_cmd(torchrun_cmd(cfg))
    assert res.returncode == 0, res.stdout[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 6
    # Both ranks talked to the one memory: 3 phase-1 steps each of a query and an update.
    assert sorted(r["rank"] for r in summary["ranks"]) == [0, 1]
    assert all(r["memory_queries"] == 3 and r["memory_updates"] == 3 for r in summary["ranks"])
    assert summary["ddp_max_param_diff"] == 0.0
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-0000003", "step-0000006"]
    rank0_pid = next(r["pid"] for r in summary["ranks"] if r["rank"] == 0)
    for name in ckpts:
        meta = json.loads((out / "checkpoints" / name / "meta.json").read_text())
        assert meta["writer_rank"] == 0 and meta["writer_pid"] == rank0_pid
    # Every update request of both ranks landed in the shared memory before the phase-1 checkpoint.
    mem = np.load(out / "checkpoints" / "step-0000003" / "memory.npz", allow_pickle=False)
    assert int(mem["version"]) == 2 * 3
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss/m" in r] == [1, 2, 3]
    # Every miss of every rank's (pipelined) updates wrote its item id into a fresh slot.
    assert int((mem["item_ids"] >= 0).sum()) == sum(r["memory_update_misses"] for r in summary["ranks"]) > 0
    assert all(r["memory_update_hits"] + r["memory_update_misses"] == 3 * 2 for r in summary["ranks"])
    assert all(np.isfinite(r["loss/g"]) and np.isfinite(r["loss/d"]) for r in rows if "loss/g" in r)
    assert (out / "samples").is_dir() and any((out / "samples").iterdir())
    assert (out / "loss_curves.png").is_file() and (out / "config.yaml").is_file()
    models = load_checkpoint(out / "checkpoints" / "step-0000006")["models"]
    assert set(models) == {"generator", "discriminator", "extractor"} and models["generator"]


@pytest.mark.slow
def test_kill_9_then_resume_restores_the_memory(tmp_path, shards):
    """kill -9 mid phase 1 (the memory keeps changing after the checkpoint), then resume from it."""
    server = start_server(tmp_path / "mem", bind="tcp://127.0.0.1:0")
    try:
        out = tmp_path / "run"
        cfg = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=200, phase2__steps=0,
                           memory__address=server.endpoint)
        proc = subprocess.Popen(torchrun_cmd(cfg), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            ckpt = out / "checkpoints" / "step-0000006"
            wait_for(ckpt.is_dir, 300, "the step-6 checkpoint", proc)
            with MemoryClient(server.endpoint) as client:
                version = client.info()["version"]
                wait_for(lambda: client.info()["version"] > version + 2, 120, "updates after the checkpoint", proc)
        finally:
            kill_tree(proc)  # kill -9 of the launcher, both ranks (and nothing else: the server is external)
        latest = max(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
        saved = np.load(out / "checkpoints" / latest / "memory.npz", allow_pickle=False)
        with MemoryClient(server.endpoint) as client:
            # The kill may land just after a checkpoint; one more write makes sure the memory moved on.
            rng = np.random.default_rng(0)
            client.update(rng.standard_normal((2, 32)).astype(np.float32),
                          rng.random((2, 313)).astype(np.float32) + 0.01, threshold=0.0)
            assert not np.array_equal(client.export()["ages"], saved["ages"])
        # Resume with the run cut to end at the checkpoint: set-up restores the memory, no step runs.
        steps = int(latest.split("-")[1])
        res = run_cmd(torchrun_cmd(cfg, "--resume", "auto", f"phase1.steps={steps}"))
        assert res.returncode == 0, res.stdout[-4000:]
        assert f"at step {steps}" in res.stdout
        summary = json.loads((out / "run_summary.json").read_text())
        assert summary["start_step"] == steps == summary["step"] and summary["resumed_from"].endswith(latest)
        with MemoryClient(server.endpoint) as client:
            now = client.export()
        np.testing.assert_allclose(now["keys"], saved["keys"], atol=1e-6)
        np.testing.assert_allclose(now["values"], saved["values"], atol=1e-6)
        np.testing.assert_array_equal(now["ages"], saved["ages"])
        np.testing.assert_array_equal(now["item_ids"], saved["item_ids"])
    finally:
        server.stop()


@pytest.mark.slow
def test_resume_with_embedded_server_continues_to_the_end(tmp_path, shards):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=3, phase2__steps=300)
    proc = subprocess.Popen(torchrun_cmd(cfg), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        wait_for((out / "checkpoints" / "step-0000006").is_dir, 300, "the step-6 checkpoint", proc)
    finally:
        kill_tree(proc)  # kill -9 of the launcher, both ranks and the embedded server alike
    latest = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    res = run_cmd(torchrun_cmd(cfg, f"phase2.steps={latest - 3 + 2}"))  # default --resume auto
    assert res.returncode == 0, res.stdout[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["start_step"] == latest and summary["step"] == latest + 2
    assert (out / "checkpoints" / f"step-{latest + 2:07d}").is_dir()


def test_model_shape_change_on_resume_is_a_clear_error(tmp_path, shards, capsys):
    """In this process (one rank, the in-process memory): the refusal comes before any step or server."""
    from launch.train import main

    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=1, phase2__steps=0, run__checkpoint_every=1,
                       memory__address="inproc", data__workers=0)
    assert main(["--config", str(cfg)]) == 0
    capsys.readouterr()
    assert main(["--config", str(cfg), "model.generator.width=8", "phase1.steps=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot resume from {out / 'checkpoints' / 'step-0000001'}: these keys change the "
                          "saved model's shape: model.generator.width.")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]  # nothing trained, nothing lost


@pytest.mark.slow
def test_server_dying_mid_run_is_reported_clearly(tmp_path, shards):
    server = start_server(tmp_path / "mem", bind="tcp://127.0.0.1:0")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=500, phase2__steps=0,
                       memory__address=server.endpoint, memory__timeout_ms=1500, memory__retries=1,
                       run__collective_timeout_s=60)
    proc = subprocess.Popen(torchrun_cmd(cfg, nproc=1), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        with MemoryClient(server.endpoint) as client:
            wait_for(lambda: client.info().get("version", 0) >= 3, 300, "a few updates", proc)
        server.kill()
        out_text, _ = proc.communicate(timeout=180)
    finally:
        kill_tree(proc)
        server.stop()
    assert proc.returncode != 0
    assert "MemoryUnavailable" in out_text and server.endpoint in out_text


def test_config_errors_exit_2_with_the_path(tmp_path, capsys):
    from launch.train import main

    assert main(["model.generator.widht=3", "data.train=x.tar"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown key model.generator.widht (known: ")
    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: data.train must name the training shards")
    assert main(["data.train=" + str(tmp_path / "none-{000000..000001}.tar"), f"run.out_dir={tmp_path / 'run'}"]) == 2
    assert "no shard matches the data pattern" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything started


@pytest.mark.slow
def test_accelerate_launch_with_the_shipped_config_starts_two_ranks(tmp_path, shards):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shards, out, phase1__steps=2, phase2__steps=1)
    accelerate = str(Path(PYTHON).with_name("accelerate"))
    res = run_cmd([accelerate, "launch", "--config_file", "configs/accelerate_ddp.yaml", "launch/train.py",
                   "--config", str(cfg)])
    assert res.returncode == 0, res.stdout[-4000:]
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ddp_max_param_diff"] == 0.0
    assert res.stdout.count("done: step 3") == 1  # printed by rank 0 only

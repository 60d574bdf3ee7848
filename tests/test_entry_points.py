"""colorize / memorize / evaluate on a tiny real checkpoint, through their command lines."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelpers import PYTHON, run_cmd, write_config, write_tiny_shards

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from pccnet.color import rgb_to_lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-process debug run of both phases: (run dir, shard pattern)."""
    root = tmp_path_factory.mktemp("entry")
    shards = write_tiny_shards(root / "shards")
    out = root / "run"
    cfg = write_config(root / "c.yaml", shards, out, phase1__steps=4, phase2__steps=3, run__checkpoint_every=100,
                       data__val=shards)
    res = run_cmd([PYTHON, "launch/train.py", "--config", str(cfg)])
    assert res.returncode == 0, res.stdout[-4000:]
    # End of phase 1: retrieval accuracy on data.val, measured the way test time retrieves.
    rows = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    acc = [r["val/retrieval_acc"] for r in rows if "val/retrieval_acc" in r]
    assert len(acc) == 1 and 0.0 <= acc[0] <= 1.0
    return out, shards


@pytest.fixture()
def photos(tmp_path):
    """Inputs of three kinds: an odd-sized colour JPEG, an RGBA PNG, a gray PNG."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)).save(folder / "colour.jpg")
    rgba = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
    rgba[:20, :, 3] = 0
    Image.fromarray(rgba, "RGBA").save(folder / "sub" / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8), "L").save(folder / "gray.png")
    return folder


def _lightness(path) -> torch.Tensor:
    rgb = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return rgb_to_lab(rgb[None])[0, 0]


def test_colorize_keeps_resolution_and_lightness(trained, photos, tmp_path):
    run, _ = trained
    out = tmp_path / "out"
    res = run_cmd([PYTHON, "launch/colorize.py", "--checkpoint", str(run), "--input", str(photos),
                   "--output", str(out), "--batch-size", "2"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "colorized 3 of 3" in res.stdout
    for name, size in (("colour.png", (45, 37)), ("alpha.png", (40, 40)), ("gray.png", (30, 50))):
        img = Image.open(out / name)
        assert img.mode == "RGB" and img.size == size
    # The output's L channel is the input's own full-resolution L (up to uint8 rounding and gamut clipping).
    diff = (_lightness(out / "gray.png") - _lightness(photos / "gray.png")).abs()
    assert float(diff.median()) < 1.0
    # The transparent half of the RGBA input was composited onto white, as in training.
    assert float(_lightness(out / "alpha.png")[:20].mean()) > 95


def test_colorize_errors_are_clear(trained, photos, tmp_path):
    run, _ = trained
    res = run_cmd([PYTHON, "launch/colorize.py", "--checkpoint", str(run), "--input", str(tmp_path / "nope*.png"),
                   "--output", str(tmp_path / "o")])
    assert res.returncode == 2 and "matches no image" in res.stdout
    res = run_cmd([PYTHON, "launch/colorize.py", "--checkpoint", str(tmp_path / "missing"), "--input",
                   str(photos), "--output", str(tmp_path / "o")])
    assert res.returncode == 2 and "missing" in res.stdout and "does not exist" in res.stdout
    assert "Traceback" not in res.stdout


def test_memorize_then_colorize_with_the_named_memory(trained, photos, tmp_path):
    run, _ = trained
    server = start_server(tmp_path / "mem", bind="tcp://127.0.0.1:0")
    try:
        res = run_cmd([PYTHON, "launch/memorize.py", "--checkpoint", str(run), "--memory", server.endpoint,
                       "--name", "few", "--input", str(photos), "--capacity", "8"])
        assert res.returncode == 0, res.stdout[-3000:]
        assert "memorized 3 of 3" in res.stdout
        with MemoryClient(server.endpoint) as client:
            info = client.info(memory="few")
            assert info["capacity"] == 8 and info["filled"] == 3 and info["key_dim"] == 32
            exported = client.export(memory="few")
            written = exported["item_ids"] >= 0
            assert written.sum() == 3
            # Each image got its own slot holding its own colour distribution (non-uniform).
            assert np.all(exported["values"][written].max(1) > 2.0 / 313)
        out = tmp_path / "out"
        res = run_cmd([PYTHON, "launch/colorize.py", "--checkpoint", str(run), "--input", str(photos / "colour.jpg"),
                       "--output", str(out), "--memory", server.endpoint, "--memory-name", "few"])
        assert res.returncode == 0, res.stdout[-3000:]
        assert (out / "colour.png").is_file()
        res = run_cmd([PYTHON, "launch/colorize.py", "--checkpoint", str(run), "--input", str(photos / "colour.jpg"),
                       "--output", str(out), "--memory", server.endpoint, "--memory-name", "absent"])
        assert res.returncode != 0 and "absent" in res.stdout
    finally:
        assert server.stop() == 0


def test_evaluate_retrieval_scores_the_memory(trained, tmp_path):
    run, shards = trained
    out = tmp_path / "retrieval.json"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--retrieval"])
    assert res.returncode == 0, res.stdout[-3000:]
    r = json.loads(out.read_text())
    assert r["n_images"] == 16 and r["written_slots"] >= 1
    # The retrieved slot is one of the written ones, so it can never beat the best of them.
    assert r["oracle_kl"] <= r["retrieval_kl"] + 1e-6
    assert 0.0 <= r["acc@0.5"] <= r["acc@1"] <= r["acc@1.5"] <= 1.0


def test_evaluate_writes_every_metric(trained, tmp_path):
    run, shards = trained
    out = tmp_path / "eval.json"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "5"])
    assert res.returncode == 0, res.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["n_images"] == 16 and result["small_set"] is True
    for key in ("fid", "lpips", "psnr", "colorfulness"):
        assert np.isfinite(result[key]), key
    assert "| FID |" in res.stdout
    assert result["fid_bootstrap_n"] == 5 and result["fid_bootstrap_std"] > 0.0
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "-1"])
    assert res.returncode == 2 and "-1" in res.stdout
    gray = tmp_path / "gray.json"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(gray),
                   "--bootstrap", "5", "--baseline", "gray"])
    assert res.returncode == 0, res.stdout[-3000:]
    gray_result = json.loads(gray.read_text())
    assert gray_result["colorfulness"] < 0.5 < gray_result["colorfulness_real"]
    assert gray_result["n_images"] == 16


def test_evaluate_with_each_image_own_colour_feature(trained, tmp_path):
    run, shards = trained
    out = tmp_path / "own.json"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "5", "--color-feature", "own"])
    assert res.returncode == 0, res.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["color_feature"] == "own" and result["n_images"] == 16 and np.isfinite(result["fid"])
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "5", "--color-feature", "own", "--baseline", "gray"])
    assert res.returncode == 2 and "--color-feature own" in res.stdout


def test_predict_ab_is_conditioned_on_the_given_colour_feature(trained):
    import torch

    from pccnet.color import NUM_BINS
    from trainer.inference import Colorizer

    run, _ = trained
    light = torch.rand(2, 1, 32, 32) * 2 - 1
    with Colorizer(run, device="cpu") as col:
        one_hot = torch.zeros(2, NUM_BINS)
        one_hot[:, 0] = 1.0
        uniform = torch.full((2, NUM_BINS), 1.0 / NUM_BINS)
        a, b = col.predict_ab(light, one_hot), col.predict_ab(light, uniform)
    assert a.shape == (2, 2, 32, 32)
    assert not torch.allclose(a, b), "the colour feature passed in does not reach the generator"


def test_evaluate_with_the_memory_of_another_checkpoint(trained, tmp_path):
    run, shards = trained
    from trainer.checkpoint import list_checkpoints

    ckpt = list_checkpoints(run)[-1]
    out = tmp_path / "other.json"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "5", "--memory-from", str(ckpt)])
    assert res.returncode == 0, res.stdout[-3000:]
    assert json.loads(out.read_text())["memory_from"] == str(ckpt)
    missing = tmp_path / "no-such-checkpoint"
    res = run_cmd([PYTHON, "launch/evaluate.py", "--checkpoint", str(run), "--data", shards, "--output", str(out),
                   "--bootstrap", "5", "--memory-from", str(missing)])
    assert res.returncode == 2 and str(missing) in res.stdout


def test_calibrate_threshold_reports_the_quantile(trained):
    run, _ = trained
    config = run.parent / "c.yaml"
    res = run_cmd([PYTHON, "launch/calibrate_threshold.py", "--config", str(config), "--positive-rate", "0.2"])
    assert res.returncode == 0, res.stdout[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("phase1.threshold for 20% positive pairs")]
    assert len(line) == 1 and float(line[0].split(":")[-1]) > 0.0
    res = run_cmd([PYTHON, "launch/calibrate_threshold.py", "--config", str(config), "--positive-rate", "1.5"])
    assert res.returncode == 2 and "1.5" in res.stdout

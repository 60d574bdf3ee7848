"""colorize / memorize / evaluate / calibrate_threshold on a tiny real checkpoint, through main(argv) (one
colorize through the installed console script, in its own process)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from trainhelpers import PYTHON, run_cmd, write_config, write_tiny_shards

from launch.calibrate_threshold import main as calibrate_main
from launch.colorize import main as colorize_main
from launch.evaluate import main as evaluate_main
from launch.memorize import main as memorize_main
from launch.train import main as train_main
from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from pccnet.color import rgb_to_lab

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-process debug run of both phases, in this process: (run dir, shard pattern)."""
    root = tmp_path_factory.mktemp("entry")
    shards = write_tiny_shards(root / "shards")
    out = root / "run"
    # phase2.feature_blend 0 (the paper's phase 2): G after 3 steps barely responds to the colour feature, and
    # with the blend the default and k=1 answers round to the same 8-bit PNG; the retrieval-option test below
    # is about retrieval, not the blend.
    cfg = write_config(root / "c.yaml", shards, out, phase1__steps=4, phase2__steps=3, run__checkpoint_every=100,
                       data__val=shards, data__workers=0, phase2__feature_blend=0.0)
    assert train_main(["--config", str(cfg)]) == 0
    return out, shards


def _final_memory(run: Path) -> dict:
    return dict(np.load(run / "checkpoints" / "step-0000007" / "memory.npz", allow_pickle=False))


@pytest.fixture(scope="module")
def test_split(tmp_path_factory) -> str:
    """4 other images for the image metrics: FID's Inception (0.2-0.5 s an image here) is evaluate's slow part."""
    return write_tiny_shards(tmp_path_factory.mktemp("test-split"), n_shards=1, per_shard=4, seed=1)


def _usage_error(main, argv: list[str], capsys) -> str:
    """An argument error: argparse's exit code 2 and its message."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


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
    res = run_cmd([str(Path(PYTHON).with_name("pccnet-colorize")), "--checkpoint", str(run), "--input", str(photos),
                   "--output", str(out), "--batch-size", "2"])
    assert res.returncode == 0, res.stdout[-3000:]
    assert "colorized 3 of 3" in res.stdout
    for name, size in (("colour.png", (45, 37)), ("sub/alpha.png", (40, 40)), ("gray.png", (30, 50))):  # tree mirrored
        img = Image.open(out / name)
        assert img.mode == "RGB" and img.size == size
    # The output's L channel is the input's own full-resolution L (up to uint8 rounding and gamut clipping).
    diff = (_lightness(out / "gray.png") - _lightness(photos / "gray.png")).abs()
    assert float(diff.median()) < 1.0
    # The transparent half of the RGBA input was composited onto white, as in training.
    assert float(_lightness(out / "sub" / "alpha.png")[:20].mean()) > 95


def test_colorize_errors_are_clear(trained, photos, tmp_path, capsys):
    run, _ = trained
    assert colorize_main(["--checkpoint", str(run), "--input", str(tmp_path / "nope*.png"),
                          "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: input {str(tmp_path / 'nope*.png')!r} matches no image file\n"
    assert colorize_main(["--checkpoint", str(tmp_path / "missing"), "--input", str(photos),
                          "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint path {str(tmp_path / 'missing')!r} does not exist\n"
    err = _usage_error(colorize_main, ["--checkpoint", str(run), "--input", str(photos), "--output", "o",
                                       "--batch-size", "0"], capsys)
    assert "--batch-size must be >= 1, got 0" in err
    err = _usage_error(colorize_main, ["--checkpoint", str(run), "--input", str(photos), "--output", "o",
                                       "--memory-name", "few"], capsys)
    assert "--memory-name needs --memory" in err


def test_memorize_then_colorize_with_the_named_memory(trained, photos, tmp_path, capsys):
    run, _ = trained
    server = start_server(tmp_path / "mem", bind="tcp://127.0.0.1:0")
    try:
        assert memorize_main(["--checkpoint", str(run), "--memory", server.endpoint, "--name", "few",
                              "--input", str(photos), "--capacity", "8"]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == f"created memory 'few' on {server.endpoint}: 8 slots"
        assert lines[-1] == f"memorized 3 of 3 images into memory 'few' on {server.endpoint}"
        with MemoryClient(server.endpoint) as client:
            info = client.info(memory="few")
            assert info["capacity"] == 8 and info["filled"] == 3 and info["key_dim"] == 32
            exported = client.export(memory="few")
            written = exported["item_ids"] >= 0
            assert written.sum() == 3
            # Each image got its own slot holding its own colour distribution (non-uniform) ...
            assert np.all(exported["values"][written].max(1) > 2.0 / 313)
            # ... under the id of its path (trainer.shards.item_id, as for shard samples).
            from trainer.shards import item_id

            want = {item_id(str(p)) for p in (photos / "colour.jpg", photos / "gray.png", photos / "sub" / "alpha.png")}
            assert set(exported["item_ids"][written].tolist()) == want
            # The key is formed as the checkpoint's queries are (retrieval.flip: the mirror-averaged feature).
            from trainer.checkpoint import load_for_inference
            from trainer.images import center_crop_resize, image_to_sample, load_rgb
            from trainer.inference import load_extractor
            from trainer.retrieval import RetrievalOptions, query_features

            state = load_for_inference(run)
            cfg = state["config"]
            assert RetrievalOptions.of(cfg.retrieval).flip
            size = cfg.data.image_size
            light = image_to_sample(center_crop_resize(load_rgb(photos / "colour.jpg", cfg.data.background), size),
                                    size)["light"][None]
            with torch.no_grad():
                want_key = query_features(load_extractor(state, "cpu"), light, True)[0].numpy()
            row = np.flatnonzero(exported["item_ids"] == item_id(str(photos / "colour.jpg")))[0]
            np.testing.assert_allclose(exported["keys"][row], want_key, atol=1e-5)
        out = tmp_path / "out"
        assert colorize_main(["--checkpoint", str(run), "--input", str(photos / "colour.jpg"), "--output", str(out),
                              "--memory", server.endpoint, "--memory-name", "few"]) == 0
        assert (out / "colour.png").is_file()
        # --retrieval-option: the default mixes all three exemplars, k=1 takes the nearest one's value alone.
        top1 = tmp_path / "top1"
        assert colorize_main(["--checkpoint", str(run), "--input", str(photos / "colour.jpg"), "--output", str(top1),
                              "--memory", server.endpoint, "--memory-name", "few", "--retrieval-option", "k=1"]) == 0
        assert not np.array_equal(np.asarray(Image.open(top1 / "colour.png")), np.asarray(Image.open(out / "colour.png")))
        for bad, needle in (("k=0", "retrieval.k must be > 0, got 0"), ("kk=1", "retrieval.kk")):
            assert colorize_main(["--checkpoint", str(run), "--input", str(photos / "colour.jpg"), "--output",
                                  str(tmp_path / "bad"), "--memory", server.endpoint, "--memory-name", "few",
                                  "--retrieval-option", bad]) == 2
            assert needle in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()
        assert colorize_main(["--checkpoint", str(run), "--input", str(photos / "colour.jpg"), "--output", str(out),
                              "--memory", server.endpoint, "--memory-name", "absent"]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith("error: memory 'absent' does not exist on")
        # A memory of another shape is refused by memorize too, and nothing is written to it.
        with MemoryClient(server.endpoint) as client:
            client.create(capacity=4, key_dim=7, value_dim=313, memory="other")
        assert memorize_main(["--checkpoint", str(run), "--memory", server.endpoint, "--name", "other",
                              "--input", str(photos)]) == 2
        assert "memory 'other' has key_dim 7 and value_dim 313; this checkpoint needs 32" in capsys.readouterr().err
        with MemoryClient(server.endpoint) as client:
            assert client.info(memory="other")["filled"] == 0
    finally:
        assert server.stop() == 0


def test_evaluate_retrieval_scores_the_memory(trained, tmp_path):
    run, shards = trained
    out = tmp_path / "retrieval.json"
    # The paper's top-1, as phase 1's val/retrieval_acc measures it (the default mixes 16 values).
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(out), "--retrieval",
                          "--retrieval-option", "k=1", "--retrieval-option", "flip=false"]) == 0
    r = json.loads(out.read_text())
    assert r["retrieval"] == {"k": 1, "temperature": 0.1, "mix": "mean", "flip": False, "anneal": 1.0}
    assert r["n_images"] == 16 and r["written_slots"] == int((_final_memory(run)["item_ids"] >= 0).sum())
    assert 1 <= r["distinct_answers"] <= r["written_slots"]
    # The retrieved slot is one of the written ones, so it can never beat the best of them.
    assert r["oracle_kl"] <= r["retrieval_kl"] + 1e-6
    assert r["acc@0.5"] <= r["acc@1"] <= r["acc@1.5"]
    # The trainer measured the same thing at the end of phase 1 (data.val = these 16 images; phase 2 changes
    # neither the memory nor the extractor): the same share within the threshold.
    rows = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    assert [row["val/retrieval_acc"] for row in rows if "val/retrieval_acc" in row] == [r["acc@1.5"]]
    # ... and the configured retrieval's Jensen-Shannon to each image's own colours (the stopping rule's figure).
    mixed = tmp_path / "mixed.json"
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(mixed), "--retrieval"]) == 0
    js = json.loads(mixed.read_text())["retrieval_kl_js"]
    # Float32 features: the trainer and evaluate batch the images differently, and the CPU kernels' last bits
    # depend on the batch and the thread count (a 1e-9 tolerance failed once in CI at 8.6e-9).
    assert [row["val/retrieval_js"] for row in rows if "val/retrieval_js" in row] == [pytest.approx(js, rel=1e-5)]


@pytest.mark.slow
def test_evaluate_writes_every_metric(trained, test_split, tmp_path, capsys):
    run, _ = trained
    shards = test_split
    out = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(out), "--bootstrap", "5"]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] == 4 and result["small_set"] is True
    for key in ("fid", "lpips", "psnr", "colorfulness"):
        assert np.isfinite(result[key]), key
    assert "| FID |" in capsys.readouterr().out
    assert result["fid_bootstrap_n"] == 5 and result["fid_bootstrap_std"] > 0.0
    err = _usage_error(evaluate_main, ["--checkpoint", str(run), "--data", shards, "--output", str(out),
                                       "--bootstrap", "-1"], capsys)
    assert "--bootstrap must be >= 0, got -1" in err
    gray = tmp_path / "gray.json"
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(gray), "--bootstrap", "5",
                          "--baseline", "gray"]) == 0
    gray_result = json.loads(gray.read_text())
    assert gray_result["colorfulness"] < 0.5 < gray_result["colorfulness_real"]
    assert gray_result["n_images"] == 4
    # The gray output and the ground truth share L, so their PSNR is that of ab alone; the model's differs.
    assert gray_result["psnr"] != result["psnr"] and gray_result["colorfulness_real"] == result["colorfulness_real"]


def test_evaluate_with_each_image_own_colour_feature(trained, test_split, tmp_path, capsys):
    run, _ = trained
    shards = test_split
    out = tmp_path / "own.json"
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(out), "--bootstrap", "5",
                          "--color-feature", "own"]) == 0
    result = json.loads(out.read_text())
    assert result["color_feature"] == "own" and result["n_images"] == 4 and np.isfinite(result["fid"])
    err = _usage_error(evaluate_main, ["--checkpoint", str(run), "--data", shards, "--output", str(out),
                                       "--color-feature", "own", "--baseline", "gray"], capsys)
    assert "--color-feature own has no effect with --baseline gray" in err


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


def test_evaluate_with_the_memory_of_another_checkpoint(trained, test_split, tmp_path, capsys):
    run, shards = trained
    from trainer.checkpoint import list_checkpoints

    ckpt = list_checkpoints(run)[-1]
    out = tmp_path / "other.json"
    assert evaluate_main(["--checkpoint", str(run), "--data", test_split, "--output", str(out),
                          "--bootstrap", "0", "--memory-from", str(ckpt)]) == 0
    result = json.loads(out.read_text())
    assert result["memory_from"] == str(ckpt) and result["fid_bootstrap_std"] is None and result["n_images"] == 4
    missing = tmp_path / "no-such-checkpoint"
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(run), "--data", shards, "--output", str(out), "--memory-from",
                          str(missing)]) == 2
    assert capsys.readouterr().err == f"error: checkpoint path {str(missing)!r} does not exist\n"


def test_calibrate_threshold_reports_the_quantile(trained, capsys):
    run, shards = trained
    config = run.parent / "c.yaml"
    assert calibrate_main(["--config", str(config), "--positive-rate", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # 16 training images, every ordered pair of two different ones.
    assert lines[0] == "16 of 16 training images, 240 ordered pairs, KL in nats"
    q20 = float(lines[3].split("|")[5])  # the 0.2 quantile of the table, to 3 decimals
    line = [x for x in lines if x.startswith("phase1.threshold for 20% positive pairs")]
    assert len(line) == 1 and float(line[0].split(":")[-1]) == pytest.approx(q20, abs=5e-4) and q20 > 0.0
    err = _usage_error(calibrate_main, ["--config", str(config), "--positive-rate", "1.5"], capsys)
    assert "--positive-rate must be in (0, 1), got 1.5" in err
    assert calibrate_main(["--config", str(config), "data.train=" + shards.replace("000001", "000000")]) == 0
    assert capsys.readouterr().out.startswith("8 of 8 training images, 56 ordered pairs")

"""Inference bundles (launch/export.py, trainer/bundle.py): what is written, that nothing in it is a pickle,
that every tool taking --checkpoint takes a bundle and gets the same answers as from the checkpoint, the
model card's measured metrics, and refusals (damage, resume, an occupied output). Real embedded memory
server processes; the checkpoint is studiohelpers' tiny untrained one. The studio on a bundle:
tests/test_studio.py (test_repeated_signals_...)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from studiohelpers import blocky_image, make_checkpoint, tint_image

from launch.export import main as export_main
from launch.memory import main as memory_main
from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from trainer.checkpoint import CheckpointError, describe_path, find_resume, load_for_inference
from trainer.evaluation import evaluate_checkpoint
from trainer.inference import Colorizer, colorize_command, memorize_command
from trainer.packs import checkpoint_identity, read_pack
from trainer.shards import write_shards

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    rng = np.random.default_rng(0)
    (root / "photos").mkdir()
    for i in range(8):
        blocky_image(rng).save(root / "photos" / f"{i}.png")
    manifest = write_shards([str(root / "photos")], root / "shards", "train")  # with its manifest
    shards = str(root / "shards" / manifest["pattern"])
    run = make_checkpoint(root / "run", overrides=(f"data.train={shards}",))
    # A measurement next to the checkpoint, taken by the real evaluate command (retrieval: no FID weights).
    measured = evaluate_checkpoint(run, shards, run / "eval_retrieval.json", retrieval=True, device="cpu")
    assert export_main(["--checkpoint", str(run), "--output", str(root / "model")]) == 0
    return {"root": root, "run": run, "model": root / "model", "shards": shards, "measured": measured}


def test_the_bundle_holds_safetensors_a_pack_a_card_and_no_pickle(made):
    model = made["model"]
    names = sorted(p.relative_to(model).as_posix() for p in model.rglob("*") if p.is_file())
    assert names == ["README.md", "bundle.json", "config.yaml", "extractor.safetensors", "generator.safetensors",
                     "memory.pack"]
    for name in names:  # no pickle protocol header in any file
        assert not (model / name).read_bytes().startswith(b"\x80"), name
    info = json.loads((model / "bundle.json").read_text())
    assert info["format"] == "pccnet-bundle" and info["step"] == 1 and info["image_size"] == 32
    assert sorted(info["sha256"]) == [n for n in names if n not in ("README.md", "bundle.json")]
    assert yaml.safe_load((model / "config.yaml").read_text())["model"]["extractor"]["dim"] == 32
    assert describe_path(model) == ("bundle", model)
    # The pack says which extractor wrote its keys: the checkpoint's, and the bundle's own is the same.
    pack = read_pack(model / "memory.pack")
    identity = checkpoint_identity(made["run"])[0]
    assert pack.identity == identity == info["extractor_identity"] == checkpoint_identity(model)[0]
    assert pack.written == 8 and pack.capacity == 32


def test_the_model_card_reports_the_measured_metrics(made, tmp_path):
    card = (made["model"] / "README.md").read_text()
    m = made["measured"]
    assert "## Training" in card and "8 images in 1 shards" in card and "phase 1 (extractor and memory) 3" in card
    assert "`eval_retrieval.json`: 8 images" in card and "not the exported step" not in card
    assert f"| KL(retrieved, own), mean / median (nats) | {m['retrieval_kl']:.3f} / {m['retrieval_kl_median']:.3f} |" \
        in card
    # The run's own record: run_summary.json and the last validation retrieval accuracy in stats.jsonl.
    run = made["run"]
    (run / "run_summary.json").write_text(json.dumps({"step": 1, "world_size": 2, "resumed_from": None,
                                                      "last": {"phase": 2, "loss/g": 4.25, "loss/d": 0.5}}))
    (run / "stats.jsonl").write_text(json.dumps({"step": 1, "val/retrieval_acc": 0.375}) + "\n"
                                     + json.dumps({"step": 1, "loss/g": 4.25}) + "\n")
    assert export_main(["--checkpoint", str(run), "--output", str(tmp_path / "again")]) == 0
    again = (tmp_path / "again" / "README.md").read_text()
    assert "ended at step 1 on 2 process(es); last logged training losses (phase 2): loss/g 4.25, loss/d 0.5" \
        in again
    assert "at step 1: 0.375 (`stats.jsonl`)" in again
    (run / "run_summary.json").unlink()
    (run / "stats.jsonl").unlink()
    # Without any eval*.json the card says so instead.
    bare = make_checkpoint(tmp_path / "bare")
    assert export_main(["--checkpoint", str(bare), "--output", str(tmp_path / "bare-model")]) == 0
    assert "Not measured: no `eval*.json`" in (tmp_path / "bare-model" / "README.md").read_text()


def test_a_bundle_colorizes_and_retrieves_exactly_as_its_checkpoint(made, tmp_path):
    rng = np.random.default_rng(3)
    photos = [blocky_image(rng, (57, 41)), tint_image((200, 40, 40), rng)]
    with Colorizer.from_pretrained(made["run"]) as a, Colorizer.from_pretrained(made["model"]) as b:
        got_a, ans_a = a.colorize_images(photos, with_answers=True)
        got_b, ans_b = b.colorize_images(photos, with_answers=True)
    assert ans_a == ans_b and all(x["slot"] is not None for x in ans_a)
    for x, y in zip(got_a, got_b):
        np.testing.assert_array_equal(x, y)
    # The evaluate command on the bundle measures what it measured on the checkpoint.
    again = evaluate_checkpoint(made["model"], made["shards"], tmp_path / "e.json", retrieval=True, device="cpu")
    assert again["retrieval_kl"] == made["measured"]["retrieval_kl"] and again["n_images"] == 8


def test_colorize_memorize_and_packs_take_a_bundle(made, tmp_path, capsys):
    rng = np.random.default_rng(4)
    (tmp_path / "in").mkdir()
    for i in range(2):
        blocky_image(rng).save(tmp_path / "in" / f"p{i}.png")
    assert colorize_command(made["model"], [str(tmp_path / "in")], tmp_path / "out") == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.csv", "p0.png", "p1.png"]
    server = start_server(tmp_path / "mem", durability="none")
    try:
        assert memorize_command(made["model"], server.endpoint, "few", [str(tmp_path / "in")], capacity=8) == 0
        with MemoryClient(server.endpoint) as c:
            assert int((c.export(memory="few")["item_ids"] >= 0).sum()) == 2
        # pack export records the bundle's extractor identity; import with the checkpoint accepts it.
        pack = tmp_path / "few.pack"
        assert memory_main(["pack", "export", "--checkpoint", str(made["model"]), "--memory", server.endpoint,
                            "--name", "few", "--output", str(pack)]) == 0
        assert read_pack(pack).identity == checkpoint_identity(made["run"])[0]
        assert memory_main(["pack", "import", "--checkpoint", str(made["run"]), "--memory", server.endpoint,
                            "--input", str(pack), "--name", "few2"]) == 0
    finally:
        server.stop()
    capsys.readouterr()


def test_refusals(made, tmp_path):
    # Resuming training from a bundle: it holds no optimizer state.
    with pytest.raises(CheckpointError, match="exported model .* no optimizer state"):
        find_resume(tmp_path, str(made["model"]))
    # An occupied output is kept unless --overwrite; the source itself never.
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep me")
    assert export_main(["--checkpoint", str(made["run"]), "--output", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "mine.txt").read_text() == "keep me"
    assert export_main(["--checkpoint", str(made["run"]), "--output", str(tmp_path / "taken"), "--overwrite"]) == 0
    assert not (tmp_path / "taken" / "mine.txt").exists() and (tmp_path / "taken" / "bundle.json").is_file()
    assert not list(tmp_path.glob(".taken.*"))  # no temporary or old folder left
    # A damaged weight file fails its checksum, naming the file.
    data = bytearray((tmp_path / "taken" / "generator.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "taken" / "generator.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="generator.safetensors does not match its sha256"):
        load_for_inference(tmp_path / "taken")
    # A bundle.json naming a path outside the bundle is refused before anything is read.
    info = json.loads((made["model"] / "bundle.json").read_text())
    (tmp_path / "evil").mkdir()
    for name in ("config.yaml", "generator.safetensors", "extractor.safetensors"):
        (tmp_path / "evil" / name).write_bytes((made["model"] / name).read_bytes())
    info["sha256"] = {"../run/checkpoints/step-0000001/meta.json": "0" * 64}
    (tmp_path / "evil" / "bundle.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="names a file"):
        load_for_inference(tmp_path / "evil")
    # The card may be edited: it is not checksummed.
    (made["model"] / "README.md").write_text((made["model"] / "README.md").read_text() + "\nLicence: mine\n")
    assert load_for_inference(made["model"])["meta"]["step"] == 1


def test_the_legacy_checkpoint_exports_and_colorizes_as_before(tmp_path):
    legacy = Path(__file__).resolve().parent / "assets" / "legacy_checkpoint"
    from test_legacy_checkpoint import picture

    expected = np.load(legacy / "expected.npz", allow_pickle=False)
    assert export_main(["--checkpoint", str(legacy), "--output", str(tmp_path / "m")]) == 0
    with Colorizer(tmp_path / "m", device="cpu") as col:
        rgb = col.colorize_images([picture()])[0]
    assert np.abs(rgb.astype(int) - expected["rgb"]).max() <= 1

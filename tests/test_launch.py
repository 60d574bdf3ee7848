"""launch/: every script runs as documented (`python launch/X.py`, the installed console scripts), reports user
errors in one line, and the orchestrating scripts' parts work (demo, prepare_shared_data, results, fewshot)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from trainhelpers import write_tiny_shards

from launch import demo, fewshot_example, prepare_shared_data, results
from launch.common import report_errors
from trainer.config import load_config

REPO = Path(__file__).resolve().parents[1]
LEGACY = REPO / "tests" / "assets" / "legacy_checkpoint"
SCRIPTS = sorted(p.stem for p in (REPO / "launch").glob("*.py") if p.stem not in ("__init__", "common"))


def test_every_script_runs_from_a_checkout_and_every_console_script_is_installed():
    scripts = {e.name: e.value for e in distribution("pccnet").entry_points if e.group == "console_scripts"}
    launched = {name: target for name, target in scripts.items() if target.startswith("launch.")}
    assert set(launched) >= {"pccnet-train", "pccnet-colorize", "pccnet-memorize", "pccnet-evaluate",
                             "pccnet-make-shards"}
    commands = [[sys.executable, f"launch/{s}.py", "--help"] for s in SCRIPTS]
    commands += [[str(Path(sys.executable).with_name(name)), "--help"] for name in launched]
    procs = [subprocess.Popen(c, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    for cmd, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.startswith("usage: "), (cmd, err[-2000:])
    for target in launched.values():  # a console script calls the same main as the file
        module, func = target.split(":")
        assert func == "main" and module.split(".")[1] in SCRIPTS


def test_report_errors_turns_the_named_errors_into_one_line(capsys):
    def fails() -> None:
        raise ValueError("bad value 3")

    assert report_errors(fails, (ValueError,)) == 2
    assert capsys.readouterr().err == "error: bad value 3\n"
    assert report_errors(fails, (ValueError,), code=1, prefix="tool: error") == 1
    assert capsys.readouterr().err == "tool: error: bad value 3\n"
    assert report_errors(lambda: 1, (ValueError,)) == 1 and report_errors(lambda: {"a": 1}, (ValueError,)) == 0
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is shown
        report_errors(lambda: {}["missing"], (ValueError,))


def test_demo_crops_and_comparison_sheet(tmp_path):
    photos = demo.skimage_photos()
    assert set(photos) == set(demo.PHOTOS) and all(p.is_file() for p in photos.values())
    n = demo.write_crops({"rocket.jpg": photos["rocket.jpg"]}, tmp_path / "crops")
    crops = sorted((tmp_path / "crops").glob("*.png"))
    assert n == len(crops) == demo.CROPS_PER_PHOTO
    assert Image.open(crops[0]).size == (demo.CROP_SIZE, demo.CROP_SIZE)
    sheet = demo.comparison_sheet([photos["coffee.png"]], [crops[0]], tmp_path / "sheet.png", height=50)
    w, h = Image.open(sheet).size
    coffee = Image.open(photos["coffee.png"])
    assert h == 54 and w == 3 * int(coffee.width * 50 / coffee.height) + 8  # gray | colour | original


def _fake_shared(root: Path) -> Path:
    """The shared data layout with two tiny images per split list (20 where a validation split is cut from it)."""
    rng = np.random.default_rng(0)
    for split in prepare_shared_data._splits():
        (root / split.root).mkdir(parents=True, exist_ok=True)
        # A list cut into train and val (1 in VAL_EVERY) needs VAL_EVERY names for one val image.
        n = 2 if split.take == "all" else prepare_shared_data.VAL_EVERY
        stem = f"{split.name}_{split.prefix}" if split.take == "all" else Path(split.list_file).stem
        names = [f"{stem}_{i}.png" for i in range(n)]
        for name in names:
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / split.root / name)
        (root / split.list_file).write_text("\n".join(names) + "\n")
    return root


def test_prepare_shared_data_builds_every_split_then_only_checks(tmp_path, capsys):
    shared = _fake_shared(tmp_path / "shared")
    out = tmp_path / "shards"
    assert prepare_shared_data.prepare(shared, out, workers=0, force=False) == 0
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + len(prepare_shared_data._splits()) and all(" built " in line for line in table[1:])
    assert len((out / "flowers64_fewshot_base" / "val-list.txt").read_text().splitlines()) == 1
    manifest = json.loads((out / "pokemon_every10" / "train-manifest.json").read_text())
    assert manifest["total"] == 2 and (out / "pokemon_every10" / "train-000000.tar").is_file()
    assert prepare_shared_data.prepare(shared, out, workers=0, force=False) == 0
    assert all(" exists " in line for line in capsys.readouterr().out.splitlines()[1:])
    (shared / "pokemon" / "split_every10_test.txt").write_text("missing.png\n")
    assert prepare_shared_data.prepare(shared, out, workers=0, force=True) == 1
    assert "pokemon_every10/test: none of the 1 images could be used" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="shared data not found"):
        prepare_shared_data.shared_data_dir(str(tmp_path / "nowhere"))


def _done_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint folder as list_checkpoints sees one (the results table only looks at its step)."""
    ckpt = run_dir / "checkpoints" / f"step-{step:07d}"
    ckpt.mkdir(parents=True)
    for name in ("models.pt", "optim.pt", "meta.json", "config.yaml"):
        (ckpt / name).write_text("{}")
    return ckpt


def test_results_tables_from_finished_rows(tmp_path, capsys):
    """Every row already trained and scored: the command only gathers, never reruns (no subprocess here)."""
    config = REPO / "configs" / "pokemon_every10_cpu.yaml"
    cfg = load_config(config)
    root = tmp_path / "root"
    phase1 = _done_checkpoint(root / results.phase1_name(cfg, "alexnet-imagenet"), cfg.phase1.steps)
    for i, row in enumerate(results.ROWS):
        if results.ROWS[row][1] is not None:
            _done_checkpoint(root / row, cfg.phase1.steps + cfg.phase2.steps)
        score = {"fid": 50.0 + i, "fid_bootstrap_std": 1.0, "n_images": 81, "lpips": 0.25, "psnr": 22.0,
                 "colorfulness": 30.0, "memory_from": str(phase1), "image_order": "same",
                 "fid_bootstrap": [50.0 + i, 51.0 + 2 * i, 49.0 + i]}
        (root / f"eval-{row}.json").write_text(json.dumps(score))
    assert results.results_table(str(config), cfg, root, ["full", "gray"], [], root / "commands.txt") == 0
    table = capsys.readouterr().out
    assert "| PCCNet (full) | 50.00 ± 1.0 (81) |  | 0.2500 | 22.00 | 30.00 |" in table
    # Each other row's FID difference to full's, with the spread of the per-resampling differences.
    gray = list(results.ROWS).index("gray")
    want = f"| {gray:+.2f} ± {float(np.std([0.0, float(gray), 0.0])):.2f} |"
    assert want in next(line for line in table.splitlines() if line.startswith(f"| {results.ROWS['gray'][0]} |"))
    gathered = json.loads((root / "results.json").read_text())
    assert list(gathered) == list(results.ROWS) and not (root / "commands.txt").exists()
    for backbone in results.BACKBONES:
        if backbone != "alexnet-imagenet":  # the table's own phase 1 is done already
            _done_checkpoint(root / results.phase1_name(cfg, backbone), cfg.phase1.steps)
        score = {"retrieval_kl": 1.0, "chance_kl": 2.0, "oracle_kl": 0.5, "acc@0.5": 0.1, "acc@1.5": 0.3,
                 "written_slots": 40, "distinct_answers": 12}
        (root / f"retrieval-{backbone}-t{cfg.phase1.threshold:g}.json").write_text(json.dumps(score))
    assert results.backbone_table(str(config), cfg, root, [], root / "commands.txt") == 0
    assert "| vgg16-imagenet | 1.000 | 2.000 | 0.500 | 0.100 | 0.300 | 40 | 12 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown rows"):
        results.results_table(str(config), cfg, root, ["fulll"], [], root / "commands.txt")
    with pytest.raises(SystemExit, match="data.val must name the test split"):
        results.reproduce(str(REPO / "configs" / "debug_cpu.yaml"), [], str(root), "full", False, None, 2)


def test_results_table_over_seeds_from_finished_rows(tmp_path, capsys):
    """--seeds: each seed's rows in <row>-seed<N> (the config's seed in <row>), gathered without rerunning."""
    config = REPO / "configs" / "pokemon_every10_cpu.yaml"
    cfg = load_config(config)
    root = tmp_path / "root"
    phase1 = _done_checkpoint(root / results.phase1_name(cfg, "alexnet-imagenet"), cfg.phase1.steps)
    fids = {("full", 0): 50.0, ("no_memory", 0): 60.0, ("full", 4): 40.0, ("no_memory", 4): 44.0}
    for (row, seed), fid in fids.items():
        name = f"{row}-seed{seed}" if seed else row
        _done_checkpoint(root / name, cfg.phase1.steps + cfg.phase2.steps)
        score = {"fid": fid, "fid_bootstrap_std": 1.0, "n_images": 81, "lpips": 0.25, "psnr": 22.0,
                 "colorfulness": 30.0, "memory_from": str(phase1), "image_order": "same",
                 "fid_bootstrap": [fid, fid + 1.0, fid - 1.0] if row == "full" else [fid, fid + 1.0, fid - 2.0]}
        (root / f"eval-{name}.json").write_text(json.dumps(score))
    assert results.results_table(str(config), cfg, root, ["full", "no_memory"], [], root / "commands.txt",
                                 seeds=[0, 4]) == 0
    out = capsys.readouterr().out
    assert not (root / "commands.txt").exists()  # nothing trained or scored again
    summary = json.loads((root / "seeds.json").read_text())
    assert summary["seeds"] == [0, 4]
    nom = summary["rows"]["no_memory"]
    assert nom["fid_per_seed"] == [60.0, 44.0] and nom["delta_fid"] == pytest.approx(7.0)
    assert [d["delta"] for d in nom["delta_per_seed"]] == [10.0, 4.0]
    assert "Over seeds 0, 4" in out
    assert "| without M | 0,4 | 52.00 ± 11.31 | 60.00 / 44.00 | +7.00 ± 4.24 | 0 of 2 |" in out
    # results.json stays the config seed's table.
    assert json.loads((root / "results.json").read_text())["full"]["fid"] == 50.0
    with pytest.raises(SystemExit):
        results.main(["--config", str(config), "--seeds", "0,x"])
    assert "--seeds must be comma-separated integers >= 0, got '0,x'" in capsys.readouterr().err


def test_results_sample_sheet_of_trained_rows(tmp_path, capsys):
    shards = write_tiny_shards(tmp_path / "shards", n_shards=1)
    cfg = load_config(LEGACY / "config.yaml", [f"data.val={shards}", "data.workers=0"])
    root = tmp_path / "root"
    for run in (results.phase1_name(cfg, cfg.model.extractor.backbone), "full", "no_pc"):
        shutil.copytree(LEGACY, root / run / "checkpoints" / "step-0000004")
    assert results.sample_sheet(cfg, root, tmp_path / "sheet.png", n_images=3) == 0
    # gray | PCCNet | PCCNet, own c | w/o L_PC | ground truth; 3 test images of 16 px shown at 32.
    assert Image.open(tmp_path / "sheet.png").size == (5 * 36 + 4, 28 + 3 * 36)
    assert "3 colorized columns, 3 test images" in capsys.readouterr().out


@pytest.mark.slow
def test_fewshot_example_end_to_end(tmp_path, capsys):
    """Memorize 2 shots on a fresh server, colorize 2 tests with both memories (python -m launch.X)."""
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
    out = tmp_path / "example"
    assert fewshot_example.run_example(str(LEGACY), str(tmp_path / "img*.png"), out, "few", 2, 2) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores) == ["checkpoint's own memory", "few-shot memory", "original"]
    assert all(np.isfinite(s["psnr"]) and s["lpips"] > 0 for s in list(scores.values())[:2])
    assert Image.open(out / "sheet.png").size == (4 * 132, 2 * 132)
    assert "| few-shot memory |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="matches 4 images; need 9"):
        fewshot_example.run_example(str(LEGACY), str(tmp_path / "img*.png"), out, "few", 8, 1)

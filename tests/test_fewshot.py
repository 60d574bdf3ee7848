"""The few-shot scoreboard (launch/fewshot.py, trainer.fewshot): its file formats, and one end-to-end run on
tiny synthetic labelled images (real shards, real training subprocesses, a real memory server process)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from launch.fewshot import main as fewshot_main
from trainer.fewshot import parse_novel

REPO = Path(__file__).resolve().parents[1]

_field = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=8)


@given(st.lists(st.tuples(_field, _field), min_size=1, max_size=20, unique_by=lambda t: t[1]))
def test_novel_file_round_trip(pairs):
    pairs = [(label, name) for label, name in pairs if (label, name) != ("label", "image")]
    if not pairs:
        return
    text = "label\timage\n" + "".join(f"{label}\t{name}\n" for label, name in pairs)
    got = parse_novel(text)
    want: dict[str, list[str]] = {}
    for label, name in pairs:
        want.setdefault(label, []).append(name)
    assert got == want
    assert list(got) == list(dict.fromkeys(label for label, _ in pairs))  # classes in file order


@pytest.mark.parametrize("text,needle", [
    ("5\ta.jpg\n5 b.jpg\n", "line 2"),
    ("5\ta.jpg\n\tb.jpg\n", "line 2"),
    ("5\ta.jpg\t7\n", "line 1"),
    ("5\ta.jpg\n6\ta.jpg\n", "listed twice"),
    ("label\timage\n", "lists no image"),
])
def test_novel_file_errors_name_the_line(text, needle):
    with pytest.raises(ValueError, match=needle):
        parse_novel(text, "novel.tsv")


def _write_images(folder: Path, n: int, hue: tuple[int, int, int], seed: int, prefix: str) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        small = np.clip(np.asarray(hue) + rng.integers(-40, 40, (4, 4, 3)), 0, 255).astype(np.uint8)
        name = f"{prefix}_{i:02d}.png"
        Image.fromarray(small).resize((40, 40), Image.BILINEAR).save(folder / name)
        names.append(name)
    return names


def test_scoreboard_end_to_end(tmp_path, capsys):
    images = tmp_path / "images"
    base = sum((_write_images(images, 8, hue, s, f"base{s}") for s, hue in
                enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)])), [])
    novel = {"7": _write_images(images, 4, (230, 200, 20), 7, "nov7"),
             "9": _write_images(images, 4, (150, 20, 200), 9, "nov9")}
    (tmp_path / "base.txt").write_text("\n".join(base) + "\n")
    (tmp_path / "novel.tsv").write_text("label\timage\n" + "".join(
        f"{label}\t{n}\n" for label, names in novel.items() for n in names))
    cfg = yaml.safe_load((REPO / "configs" / "debug_cpu.yaml").read_text())
    cfg["run"]["out_dir"] = str(tmp_path / "unused")
    cfg["retrieval"] = {"k": 2, "mix": "mean"}
    cfg["fewshot"] = {"base": str(tmp_path / "base.txt"), "images": str(images), "shots": [1, 2], "val_every": 4}
    config = tmp_path / "fewshot.yaml"
    config.write_text(yaml.safe_dump(cfg))
    root = tmp_path / "root"
    argv = ["--config", str(config), "--novel", str(tmp_path / "novel.tsv"), "--root", str(root),
            "--rows", "full", "--phase1-steps", "2", "--phase2-steps", "2", "--bootstrap", "2",
            "--figure", str(tmp_path / "fig.png"), "--figure-images", "2", "--device", "cpu", "data.workers=0"]
    assert fewshot_main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((root / "fewshot.json").read_text())
    rows = {(r["row"], r["k"]): r for r in result["rows"]}
    assert set(rows) == {("base", 0), ("base+novel", 1), ("novel", 1), ("base+novel", 2), ("novel", 2),
                         ("oracle", None)}
    # The same test images in every row: each class's images after the largest K (2 of 4, 2 classes).
    assert {r["n_images"] for r in rows.values()} == {4}
    # A memory of the exemplars alone holds 2 classes x K slots, all written, and answers from them.
    for k in (1, 2):
        ret = rows[("novel", k)]["retrieval_scores"]
        assert ret["written_slots"] == 2 * k
        assert 1 <= ret["distinct_answers"] <= 2 * k and np.isfinite(ret["retrieval_kl"])
        assert rows[("novel", k)]["stamp"]["retrieval"]["k"] == 2
    # The shared memory is the trained one plus the exemplars.
    base_slots = rows[("base", 0)]["retrieval_scores"]["written_slots"]
    assert rows[("base+novel", 2)]["retrieval_scores"]["written_slots"] == base_slots + 4
    assert "novel exemplars alone" in out and (root / "fewshot.md").read_text().count("\n| ") == 8
    # Every row was resampled on the same images in the same order: each carries a paired FID delta.
    assert len({r["image_order"] for r in rows.values()}) == 1
    assert all(len(r["fid_bootstrap"]) == 2 for r in rows.values())
    md = (root / "fewshot.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| base memory + novel exemplars"))
    delta = rows[("base+novel", 1)]["fid"] - rows[("base", 0)]["fid"]
    assert f"| {delta:+.2f} ± " in line
    with Image.open(tmp_path / "fig.png") as fig:  # gray | K=1 | K=2 | truth, 2 test images
        assert fig.width > 4 * 64 and fig.height > 2 * 64
    # Shards: 1 in 4 base images held out for validation; the test split is only novel images.
    assert len((root / "shards" / "val-list.txt").read_text().splitlines()) == 6
    assert all("nov" in line for line in (root / "shards" / "test-list.txt").read_text().splitlines())
    # A second call re-uses every finished step and score.
    scores = root / "fewshot" / "scores"

    def files(row: str) -> list[Path]:  # <row>-<10 hex digits of what made it>.json
        return [p for p in scores.iterdir() if re.fullmatch(rf"{row}-[0-9a-f]{{10}}\.json", p.name)]

    (base_file,) = files("base")
    stamp = base_file.stat().st_mtime_ns
    assert fewshot_main(argv) == 0
    assert base_file.stat().st_mtime_ns == stamp
    # Other retrieval options score the memory rows again, into files of their own: both are kept.
    assert fewshot_main([*argv, "retrieval.k=1"]) == 0
    assert len(files("base")) == 2 and base_file.stat().st_mtime_ns == stamp
    assert len(files("oracle")) == 1  # no retrieval: the same score serves both
    # --seeds: the config's seed (0) is the run above, reused; seed 1 trains full-seed1 from the same phase 1.
    assert fewshot_main([*argv, "--seeds", "0,1"]) == 0
    assert base_file.stat().st_mtime_ns == stamp and (root / "full-seed1" / "checkpoints").is_dir()
    result = json.loads((root / "fewshot.json").read_text())
    assert set(result["seeds"]) == {"0", "1"}
    assert [r["fid"] for r in result["rows"]] == [r["fid"] for r in result["seeds"]["0"]]
    over = result["over_seeds"]
    assert set(over) == {"base", "base-K1", "novel-K1", "base-K2", "novel-K2", "oracle"}
    fids = [r["fid"] for s in ("0", "1") for r in result["seeds"][s] if r["memory"] == "base-K2"]
    assert over["base-K2"]["fid_per_seed"] == pytest.approx(fids) and over["base-K2"]["seeds"] == [0, 1]
    assert len(over["base-K2"]["delta_per_seed"]) == 2
    md = (root / "fewshot.md").read_text()
    assert "Over seeds 0, 1" in md and "| base memory + novel exemplars (one shared memory), K = 2 | 0,1 |" in md


def test_scoreboard_errors_are_clear(tmp_path, capsys):
    (tmp_path / "novel.tsv").write_text("label\timage\n1\ta.png\n")
    (tmp_path / "base.txt").write_text("b.png\n")
    argv = ["--config", str(REPO / "configs" / "debug_cpu.yaml"), "--base", str(tmp_path / "base.txt"),
            "--novel", str(tmp_path / "novel.tsv"), "--images", str(tmp_path), "--shots", "1"]
    assert fewshot_main(argv) == 2
    assert "no image left to test after 1 exemplars: 1 (1)" in capsys.readouterr().err
    assert fewshot_main([*argv[:-2], "--images", str(tmp_path / "nope")]) == 2
    assert "fewshot.images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        fewshot_main([*argv, "--seeds", "0,0"])
    assert "--seeds must be distinct integers >= 0, got '0,0'" in capsys.readouterr().err

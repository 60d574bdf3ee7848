"""The Python API (Colorizer.from_pretrained(...).colorize(...)) and folder mode (trainer/folders.py), on a
tiny checkpoint with its memory served by a real embedded server process."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from studiohelpers import blocky_image, make_checkpoint

from memory_server.client import MemoryClient
from memory_server.launcher import start_server
from pccnet.color import rgb_to_lab
from trainer.folders import output_paths
from trainer.inference import Colorizer, as_rgb_image, colorize_command
from trainer.packs import checkpoint_identity, export_pack, import_pack, read_pack, write_pack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("api") / "run")


@pytest.fixture(scope="module")
def col(ckpt):
    with Colorizer.from_pretrained(ckpt) as c:
        yield c


def _lightness(img: Image.Image) -> torch.Tensor:
    rgb = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    return rgb_to_lab(rgb[None])[0, 0]


def test_colorize_one_image_keeps_size_and_lightness(col):
    gray = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8), "L")
    out = col.colorize(gray)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == (53, 37)
    assert float((_lightness(out) - _lightness(gray)).abs().median()) < 1.0
    assert np.asarray(out).std(axis=2).mean() > 1.0  # colour, not gray


def test_colorize_accepts_arrays_and_lists_in_any_batch(col):
    rng = np.random.default_rng(1)
    gray8 = rng.integers(0, 256, (30, 41), dtype=np.uint8)
    rgb = np.asarray(blocky_image(rng, (45, 33)))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    inputs = [gray8, gray8.astype(np.float32) / 255, (gray8.astype(np.uint16) * 257), rgb, rgba, Image.fromarray(rgb)]
    outs = col.colorize(inputs)
    assert isinstance(outs, list) and [o.size for o in outs] == [(41, 30)] * 3 + [(45, 33)] * 3
    # The same picture in another dtype or container gives the same colours.
    assert np.array_equal(np.asarray(outs[0]), np.asarray(outs[1])) and np.array_equal(*map(np.asarray, outs[1:3]))
    assert np.array_equal(np.asarray(outs[3]), np.asarray(outs[4])) and np.array_equal(*map(np.asarray, outs[4:6]))
    one_by_one = [np.asarray(col.colorize(x)) for x in inputs]
    for a, b in zip(one_by_one, col.colorize(inputs, batch_size=2)):
        assert np.abs(a.astype(int) - np.asarray(b).astype(int)).max() <= 1  # batching changes nothing visible


@pytest.mark.parametrize("bad, match", [
    (np.zeros((4, 4, 2), np.uint8), "shape"), (np.zeros((0, 4), np.uint8), "shape"),
    (np.full((4, 4), 1.5, np.float32), r"\[0, 1\]"), (np.zeros((4, 4), np.int32), "int32"),
])
def test_bad_arrays_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        as_rgb_image(bad)


def test_from_pretrained_with_a_server_or_a_pack(ckpt, col, tmp_path):
    photo = Image.fromarray(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    own = np.asarray(col.colorize(photo))
    with start_server(None, durability="none") as server, MemoryClient(server.endpoint) as client:
        identity = checkpoint_identity(ckpt)[0]
        with MemoryClient(col.client.endpoint) as source:  # the checkpoint's memory, as a pack
            pack = export_pack(source, col.memory_name, identity)
        path = write_pack(pack, tmp_path / "own.pack")
        import_pack(client, read_pack(path), name="copy")
        with Colorizer.from_pretrained(ckpt, memory=server.endpoint, memory_name="copy") as remote:
            assert np.array_equal(np.asarray(remote.colorize(photo)), own)
    with Colorizer.from_pretrained(ckpt, memory=str(path)) as packed:
        assert packed.memory_label == "pack own.pack"
        assert np.array_equal(np.asarray(packed.colorize(photo)), own)


@given(st.lists(st.tuples(st.lists(st.sampled_from(["a", "b", "A", "sub"]), max_size=3),
                          st.sampled_from(["x", "X", "y"]), st.sampled_from([".png", ".jpg", ".JPG"])),
                min_size=1, max_size=12))
def test_output_paths_mirror_the_tree_and_never_collide(files):
    root = Path("/data/in")
    paths = list(dict.fromkeys(root.joinpath(*dirs, stem + ext) for dirs, stem, ext in files))
    outs = output_paths(paths)
    assert len(set(outs)) == len(outs) == len(paths)
    for p, o in zip(paths, outs):
        assert not o.is_absolute() and ".." not in o.parts and o.suffix == ".png"
        assert o.name in (p.stem + ".png", p.name + ".png")


def test_folder_mode_skips_mirrors_and_writes_a_manifest(ckpt, tmp_path, capsys):
    rng = np.random.default_rng(4)
    tree = {"a/x.png": (20, 30), "b/x.png": (31, 17), "c/y.png": (16, 16), "c/y.jpg": (25, 19)}
    for rel, size in tree.items():
        (tmp_path / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        blocky_image(rng, size).save(tmp_path / "in" / rel)
    (tmp_path / "in" / "c" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    args = (ckpt, [str(tmp_path / "in")], out)
    assert colorize_command(*args) == 0
    said = capsys.readouterr()
    assert "colorized 4 of 5 images" in said.out and "broken.png" in said.err
    expected = {"a/x.png": (20, 30), "b/x.png": (31, 17), "c/y.png.png": (16, 16), "c/y.jpg.png": (25, 19)}
    for rel, size in expected.items():
        assert Image.open(out / rel).size == size
    with open(out / "manifest.csv", newline="") as f:
        rows = {r["output"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(expected)
    assert all(r["memory"] == "checkpoint default" and r["slot"].isdigit() and -1 <= float(r["similarity"]) <= 1
               for r in rows.values())
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    # A re-run skips what is there; a deleted output is redone; --overwrite redoes all.
    stamp = os.stat(out / "a/x.png").st_mtime_ns
    assert colorize_command(*args) == 0
    said = capsys.readouterr().out
    assert "colorized 0 of 5 images" in said and "4 already there" in said
    assert os.stat(out / "a/x.png").st_mtime_ns == stamp
    (out / "b/x.png").unlink()
    assert colorize_command(*args) == 0
    assert "colorized 1 of 5 images" in capsys.readouterr().out and (out / "b/x.png").is_file()
    assert colorize_command(*args, overwrite=True) == 0
    assert "colorized 4 of 5 images" in capsys.readouterr().out
    with open(out / "manifest.csv", newline="") as f:
        assert sorted(r["output"] for r in csv.DictReader(f)) == sorted(expected)

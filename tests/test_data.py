"""trainer.data and trainer.images: tiny shards written here (plain tarfile, no project writer)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import trainer.data as data_module
from pccnet.color import AB_BINS, color_distribution, lab_from_network, lab_to_rgb, rgb_to_lab
from trainer.config import DataConfig
from trainer.data import (
    DataError,
    count_samples,
    expand_pattern,
    make_eval_loader,
    make_train_loader,
    shard_name,
)
from trainer.images import (
    ImageDecodeError,
    center_crop_resize,
    color_feature,
    image_to_sample,
    load_rgb,
    parse_background,
)
from trainer.shards import item_id

REPO = Path(__file__).resolve().parents[1]
SIZE = 16


# --- fixtures: images and shards -------------------------------------------------------------------
def picture(w: int, h: int, seed: int) -> np.ndarray:
    """A smooth, colourful uint8 [h, w, 3] image (gradients plus a blob), different per seed."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    img = np.stack([
        127 + 120 * np.sin(a * x / w * np.pi + seed),
        127 + 120 * np.cos(b * y / h * np.pi),
        127 + 120 * np.sin(c * (x + y) / (w + h) * np.pi * 2),
    ], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    img.save(buf, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def rgba_picture(seed: int) -> np.ndarray:
    """32x32 RGBA: opaque colours, a fully transparent frame storing RGB (0,0,0) as the Pokemon PNGs do."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = picture(32, 32, seed)
    rgba[..., 3] = 255
    rgba[:6], rgba[-6:], rgba[:, :6], rgba[:, -6:] = 0, 0, 0, 0
    return rgba


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """Five shards of unequal length (5, 3, 4, 7, 1 samples): jpg/jpeg/png/webp, with and without json,
    one RGBA image, one corrupt image and one sample without an image. Returns what a reader must see."""
    root = tmp_path_factory.mktemp("shards")
    expected: dict[str, bytes] = {}  # "<shard>/<key>" -> original image bytes
    layout: list[list[tuple[str, str, bytes | None]]] = [
        [(f"a{i}", "jpg", encode(picture(48, 32, i), "JPEG")) for i in range(4)]
        + [("a_big", "jpg", encode(picture(200, 120, 99), "JPEG"))],  # big enough for JPEG draft decoding
        [(f"b{i}", "png", encode(picture(32, 48, 10 + i), "PNG")) for i in range(2)]
        + [("b_rgba", "png", encode(rgba_picture(3), "PNG", "RGBA"))],
        [("c0", "webp", encode(picture(40, 40, 20), "WEBP")), ("c1", "jpeg", encode(picture(36, 30, 21), "JPEG")),
         ("c_bad", "jpg", b"\xff\xd8\xff\xe0 this is not a jpeg at all"), ("c_nojpg", "json", None)],
        [(f"d{i}", "png", encode(picture(24 + i, 24, 30 + i), "PNG")) for i in range(7)],
        [("e0", "jpg", encode(picture(20, 20, 40), "JPEG"))],
    ]
    paths = []
    for index, samples in enumerate(layout):
        path = root / f"part-{index:06d}.tar"
        members = []
        for key, ext, data in samples:
            if data is not None:
                members.append((f"{key}.{ext}", data))
            if index != 0:  # shard 0 has no json at all
                members.append((f"{key}.json", json.dumps({"source": key}).encode()))
            if data is not None and key != "c_bad":
                expected[f"{shard_name(str(path))}/{key}"] = data
        write_tar(path, members)
        paths.append(path)
    return {
        "root": root,
        "pattern": str(root / "part-{000000..000004}.tar"),
        "paths": paths,
        "expected": expected,
        "n_corrupt": 2,  # c_bad (undecodable) + c_nojpg (no image)
        "n_samples": 19,  # samples with an image file, corrupt one included (what count_samples sees)
    }


def cfg_for(pattern: str = "", **kw) -> DataConfig:
    base = dict(train=pattern, image_size=SIZE, batch_size=4, workers=2, shuffle_buffer=8)
    base.update(kw)
    return DataConfig(**base)


def eval_keys(pattern: str, cfg: DataConfig, world: int) -> tuple[list[list[str]], int, list[int]]:
    keys, corrupt, workers = [], 0, []
    for rank in range(world):
        loader = make_eval_loader(pattern, cfg, rank, world)
        keys.append([k for batch in loader for k in batch["key"]])
        corrupt += loader.n_corrupt
        workers.append(loader.num_workers)
    return keys, corrupt, workers


# --- trainer.images ----------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,rgb", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                      ("#102030", (16, 32, 48)), (" WHITE ", (255, 255, 255)),
                                      ("#A0b0C0", (160, 176, 192))])
def test_parse_background(spec, rgb):
    assert parse_background(spec) == rgb


@pytest.mark.parametrize("bad", ["purple", "#12345", "#gg0000", "", "102030"])
def test_parse_background_errors_name_the_value(bad):
    with pytest.raises(ValueError, match=repr(bad).replace("[", r"\[")):
        parse_background(bad)


@pytest.mark.parametrize("background,want", [("white", (255, 255, 255)), ("black", (0, 0, 0)),
                                             ("#4080c0", (64, 128, 192))])
def test_transparent_pixel_becomes_the_background(background, want):
    rgba = np.zeros((2, 3, 4), np.uint8)  # pixel (0,0): transparent, storing black like the Pokemon PNGs
    rgba[0, 1] = (255, 0, 0, 255)  # opaque red
    rgba[0, 2] = (255, 0, 0, 128)  # half transparent red
    rgba[1] = (0, 255, 0, 255)
    data = encode(rgba, "PNG", "RGBA")
    out = np.asarray(load_rgb(data, background)).astype(int)
    assert out.shape == (2, 3, 3)
    assert tuple(out[0, 0]) == want
    assert tuple(out[0, 1]) == (255, 0, 0)
    half = np.round(np.array([255, 0, 0]) * 128 / 255 + np.array(want) * 127 / 255)
    assert np.abs(out[0, 2] - half).max() <= 1
    assert tuple(out[1, 1]) == (0, 255, 0)


def test_load_rgb_modes_paths_and_palette_transparency(tmp_path):
    # Palette PNG whose index 0 is transparent, read from a path.
    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 0
    pal.save(tmp_path / "p.png", transparency=0)
    out = np.asarray(load_rgb(tmp_path / "p.png", "white"))
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (200, 10, 10)
    # LA (grey + alpha), L, CMYK JPEG and 16-bit grey PNG all become 8-bit RGB.
    la = np.zeros((1, 2, 2), np.uint8)
    la[0, 1] = (90, 255)
    out = np.asarray(load_rgb(encode(la, "PNG", "LA"), "black"))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[0, 1]) == (90, 90, 90)
    assert load_rgb(encode(np.full((3, 3), 7, np.uint8), "PNG")).mode == "RGB"
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    red = np.asarray(load_rgb(buf.getvalue())).astype(int)
    assert red[..., 0].min() > 200 and red[..., 1:].max() < 60
    deep = Image.fromarray(np.array([[0, 65535]], np.uint16))
    buf = io.BytesIO()
    deep.save(buf, format="PNG")
    assert np.asarray(load_rgb(buf.getvalue()))[0, :, 0].tolist() == [0, 255]


def test_load_rgb_corrupt_raises_naming_the_source(tmp_path):
    with pytest.raises(ImageDecodeError, match="cannot decode image <9 bytes>"):
        load_rgb(b"not a png")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(encode(picture(64, 64, 1), "JPEG")[:300])  # truncated
    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        load_rgb(broken)


def test_center_crop_resize_keeps_the_centre_and_antialiases():
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    out = np.asarray(center_crop_resize(Image.fromarray(wide), 8))
    assert out.shape == (8, 8, 3)
    assert (out == (0, 255, 0)).all()  # only the centre square survives
    tall = Image.fromarray(np.ascontiguousarray(wide.transpose(1, 0, 2)))
    assert (np.asarray(center_crop_resize(tall, 10)) == (0, 255, 0)).all()
    # A one-pixel checkerboard must average to grey, not alias into stripes.
    board = ((np.indices((256, 256)).sum(0) % 2) * 255).astype(np.uint8)
    small = np.asarray(center_crop_resize(Image.fromarray(board).convert("RGB"), 16)).astype(float)
    assert abs(small.mean() - 127.5) < 3 and small.std() < 3
    with pytest.raises(ValueError, match="image_size must be a positive int, got 0"):
        center_crop_resize(Image.fromarray(wide), 0)


def test_image_to_sample_shapes_ranges_flip_and_white():
    img = Image.fromarray(picture(40, 30, 5))
    s = image_to_sample(img, SIZE)
    assert s["light"].shape == (1, SIZE, SIZE) and s["ab"].shape == (2, SIZE, SIZE)
    assert s["color_feature"].shape == (313,)
    assert all(v.dtype == torch.float32 for v in s.values())
    assert s["light"].min() >= -1 and s["light"].max() <= 1 and s["ab"].abs().max() <= 1
    assert math.isclose(float(s["color_feature"].sum()), 1.0, rel_tol=1e-5)
    f = image_to_sample(img, SIZE, flip=True)
    assert torch.equal(f["light"], s["light"].flip(-1)) and torch.equal(f["ab"], s["ab"].flip(-1))
    assert torch.equal(f["color_feature"], s["color_feature"])  # the feature ignores the flip
    white = image_to_sample(Image.new("RGB", (8, 8), (255, 255, 255)), 8)
    assert torch.allclose(white["light"], torch.ones(1, 8, 8), atol=1e-4)
    assert white["ab"].abs().max() < 1e-3
    assert tuple(AB_BINS[int(white["color_feature"].argmax())]) == (0, 0)
    with pytest.raises(ValueError, match="got 0"):
        image_to_sample(img, 0)
    with pytest.raises(ValueError, match="RGBA"):
        image_to_sample(Image.new("RGBA", (8, 8)), 8)


def test_color_feature_exact_up_to_64_and_close_above():
    ab = (torch.rand(2, 2, 64, 64) - 0.5) * 120
    assert torch.equal(color_feature(ab), color_distribution(ab))
    x = torch.from_numpy(picture(256, 256, 7)).permute(2, 0, 1)[None].float() / 255
    ab = rgb_to_lab(x)[:, 1:]
    full, grid = color_distribution(ab), color_feature(ab)
    kl = (full.clamp_min(1e-8) * (full.clamp_min(1e-8) / grid.clamp_min(1e-8)).log()).sum()
    assert float(kl) < 0.01 and math.isclose(float(grid.sum()), 1.0, rel_tol=1e-5)


# --- the loaders -------------------------------------------------------------------------------------
def test_eval_batches_shapes_ranges_and_lab_round_trip(shards):
    cfg = cfg_for(workers=0)
    loader = make_eval_loader(shards["pattern"], cfg, 0, 1)
    seen = 0
    for batch in loader:
        b = len(batch["key"])
        assert 1 <= b <= 4
        assert batch["light"].shape == (b, 1, SIZE, SIZE) and batch["ab"].shape == (b, 2, SIZE, SIZE)
        assert batch["color_feature"].shape == (b, 313) and batch["item_id"].shape == (b,)
        assert batch["light"].dtype == batch["ab"].dtype == batch["color_feature"].dtype == torch.float32
        assert batch["item_id"].dtype == torch.int64 and bool((batch["item_id"] >= 0).all())
        assert batch["light"].min() >= -1 and batch["light"].max() <= 1 and batch["ab"].abs().max() <= 1
        assert torch.allclose(batch["color_feature"].sum(1), torch.ones(b), atol=1e-4)
        rgb = lab_to_rgb(lab_from_network(batch["light"], batch["ab"]))  # [B,3,H,W]
        for i, key in enumerate(batch["key"]):
            assert batch["item_id"][i] == item_id(key)
            want = center_crop_resize(load_rgb(shards["expected"][key], "white", draft_size=SIZE), SIZE)
            want = torch.from_numpy(np.array(want)).permute(2, 0, 1).float() / 255
            assert (rgb[i] - want).abs().max() < 2e-3, key
        seen += b
    assert seen == len(shards["expected"])
    assert loader.n_corrupt == shards["n_corrupt"]


def test_rgba_sample_is_composited_onto_the_configured_background(shards):
    for background, value in (("white", 1.0), ("black", -1.0)):
        batches = list(make_eval_loader(str(shards["paths"][1]), cfg_for(workers=0, background=background), 0, 1))
        keys = [k for b in batches for k in b["key"]]
        light = torch.cat([b["light"] for b in batches])[keys.index("part-000001/b_rgba")]
        corner = light[0, 0, 0]  # in the transparent frame
        assert abs(float(corner) - value) < 1e-3, background


def test_eval_covers_every_key_once_over_2_ranks_x_2_workers(shards):
    keys, corrupt, workers = eval_keys(shards["pattern"], cfg_for(workers=2), world=2)
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) and set(flat) == set(shards["expected"])
    assert all(ks for ks in keys) and workers == [2, 2]  # rank 0: 3 shards, rank 1: 2
    assert corrupt == shards["n_corrupt"]
    # More ranks than shards: the extra ranks read nothing and start no worker.
    keys, corrupt, workers = eval_keys(shards["pattern"], cfg_for(workers=2), world=7)
    flat = [k for ks in keys for k in ks]
    assert len(flat) == len(set(flat)) == len(shards["expected"])
    assert workers == [1, 1, 1, 1, 1, 0, 0] and keys[5] == keys[6] == []


def test_eval_single_shard_two_ranks(shards):
    keys, corrupt, workers = eval_keys(str(shards["paths"][3]), cfg_for(workers=2), world=2)
    assert sorted(keys[0]) == sorted(k for k in shards["expected"] if k.startswith("part-000003/"))
    assert keys[1] == [] and workers == [1, 0] and corrupt == 0


def test_train_stream_is_endless_and_full_on_every_rank(shards):
    cfg = cfg_for(shards["pattern"], workers=2, flip=True)
    for rank in range(2):
        with make_train_loader(cfg, rank, 2, seed=3) as loader:
            # 19 samples hold an image; 12 batches of 4 are 48 samples: the stream goes round several times.
            batches = [next(loader) for _ in range(12)]
        assert all(len(b["key"]) == 4 and b["light"].shape == (4, 1, SIZE, SIZE) for b in batches)
        assert all(set(b["key"]) <= set(shards["expected"]) for b in batches)


def test_building_a_train_loader_reads_no_shard(shards, tmp_path):
    """Start-up only lists the shards: a pipe: shard's command runs when the first batch is drawn."""
    marker = tmp_path / "opened"
    pattern = f"pipe:touch {marker} && cat {shards['paths'][3]}"
    with make_train_loader(cfg_for(pattern, workers=0), 0, 1, seed=0) as loader:
        assert not marker.exists()
        batch = next(loader)
        assert marker.exists() and len(batch["key"]) == 4


def test_train_stream_is_seeded_per_rank(shards):
    def first_keys(rank: int, seed: int) -> list[str]:
        with make_train_loader(cfg_for(shards["pattern"], workers=0), rank, 2, seed=seed) as loader:
            return [k for _ in range(4) for k in next(loader)["key"]]

    assert first_keys(0, 1) == first_keys(0, 1)
    assert first_keys(0, 1) != first_keys(1, 1)
    assert first_keys(0, 1) != first_keys(0, 2)


def test_train_flip_mirrors_pixels_but_not_the_colour_feature(shards):
    cfg = cfg_for(str(shards["paths"][4]), workers=0, batch_size=8, flip=True, shuffle_buffer=1)
    with make_train_loader(cfg, 0, 1, seed=0) as loader:
        batch = next(loader)  # one image, eight times
    light = batch["light"][:, 0]
    same = [bool(torch.equal(light[i], light[0])) for i in range(8)]
    mirrored = [bool(torch.equal(light[i], light[0].flip(-1))) for i in range(8)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and not all(same) and not all(mirrored)
    assert torch.equal(batch["color_feature"], batch["color_feature"][:1].expand(8, -1))


def _first_batches(pattern: str, cache_mb: int, n: int = 15) -> list[dict]:
    with make_train_loader(cfg_for(pattern, workers=0, flip=True, cache_mb=cache_mb), 0, 1, seed=5) as loader:
        return [next(loader) for _ in range(n)]  # 60 samples from 19: most are repeats


def test_sample_cache_changes_nothing_but_the_work(shards):
    cached, uncached = _first_batches(shards["pattern"], 16), _first_batches(shards["pattern"], 0)
    for a, b in zip(cached, uncached, strict=True):
        assert a["key"] == b["key"]
        for name in ("light", "ab", "color_feature", "item_id"):
            assert torch.equal(a[name], b[name]), name
    cache = data_module._SampleCache(max_bytes=3 * (4 * 4 * 3 + 313 * 4))
    for i in range(5):
        cache.put(str(i), np.zeros((4, 4, 3), np.uint8), torch.zeros(313))
    assert list(cache.items) == ["2", "3", "4"] and cache.get("0") is None and cache.get("2") is not None


def test_worker_batches_arrive_in_one_storage_and_equal_in_process_ones(shards):
    """A worker packs each batch's tensors into one shared buffer (one hand-over instead of four); the
    batches are the same, value for value, as those made in this process."""
    def batches(workers: int) -> list[dict]:
        cfg = cfg_for(shards["pattern"], workers=workers, flip=True)
        with make_train_loader(cfg, 0, 1, seed=3) as loader:
            return [next(loader) for _ in range(6)]

    names = ("light", "ab", "color_feature", "item_id")
    for a, b in zip(batches(0), batches(1), strict=True):
        assert a["key"] == b["key"]
        storages = {b[n].untyped_storage().data_ptr() for n in names}
        assert len(storages) == 1, storages
        for name in names:
            assert b[name].dtype == a[name].dtype and torch.equal(a[name], b[name]), name
        assert len({a[n].untyped_storage().data_ptr() for n in names}) == len(names)  # in-process: untouched


def test_one_storage_keeps_dtypes_shapes_and_values():
    tensors = {"f": torch.randn(3, 1, 5, 7), "i": torch.arange(3, dtype=torch.int64) * 2**40,
               "g": torch.randn(3, 313)[:, ::2], "b": torch.tensor([True, False, True])}
    packed = data_module.one_storage(tensors)
    assert len({t.untyped_storage().data_ptr() for t in packed.values()}) == 1
    for name, t in tensors.items():
        assert packed[name].dtype == t.dtype and packed[name].shape == t.shape and torch.equal(packed[name], t)
    packed["f"].fill_(0)  # views of disjoint spans: writing one leaves the others intact
    assert torch.equal(packed["i"], tensors["i"]) and torch.equal(packed["g"], tensors["g"])


def test_data_cache_mb_is_what_switches_the_cache(shards, monkeypatch):
    """data.cache_mb alone decides: with it, each sample is decoded once; with 0, on every visit."""
    decoded: list[int] = []
    real_load_rgb = data_module.load_rgb

    def counting_load_rgb(*args, **kwargs):  # a spy: the real decode, counted (workers=0: this process)
        img = real_load_rgb(*args, **kwargs)
        decoded.append(1)
        return img

    monkeypatch.setattr(data_module, "load_rgb", counting_load_rgb)
    batches = [b["key"] for b in _first_batches(shards["pattern"], 16)]
    # A batch's new samples enter the cache when it is collated: what a batch meets first is decoded.
    cached, misses = set(), 0
    for keys in batches:
        misses += sum(k not in cached for k in keys)
        cached |= set(keys)
    assert len(decoded) == misses and misses < 30 and sum(map(len, batches)) == 60
    decoded.clear()
    _first_batches(shards["pattern"], 0)
    assert len(decoded) == 60


def test_train_counts_corrupt_samples_and_keeps_going(shards):
    pattern = f"{shards['paths'][2]}::{shards['paths'][4]}"  # c_bad + c_nojpg, and e0
    with make_train_loader(cfg_for(pattern, workers=2), 0, 1, seed=0) as loader:
        batches = [next(loader) for _ in range(12)]
        assert all(len(b["key"]) == 4 for b in batches)
        per_worker: dict[int, int] = {}
        for b in batches:
            per_worker[b["worker"]] = max(per_worker.get(b["worker"], 0), b["n_corrupt"])
        assert loader.n_corrupt == sum(per_worker.values()) > 0
        assert set(per_worker) == {0, 1}


def test_train_on_nothing_usable_raises_instead_of_spinning(tmp_path):
    write_tar(tmp_path / "bad.tar", [(f"x{i}.jpg", b"garbage") for i in range(3)])
    with make_train_loader(cfg_for(str(tmp_path / "bad.tar"), workers=0), 0, 1, seed=0) as loader:
        with pytest.raises(DataError, match="in a row were unusable"):
            next(loader)


def test_truncated_shard_yields_what_it_can_and_counts_the_rest(shards, tmp_path):
    data = shards["paths"][3].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    loader = make_eval_loader(str(cut), cfg_for(workers=0), 0, 1)
    keys = [k for b in loader for k in b["key"]]
    # Every sample whose members all end before the cut comes out; the cut itself is counted once.
    ends: dict[str, int] = {}
    with tarfile.open(shards["paths"][3]) as tar:
        for m in tar.getmembers():
            key = m.name.rsplit(".", 1)[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    whole = [f"cut/{k}" for k, end in ends.items() if end <= len(data) // 2 + 100]
    assert keys == whole and 0 < len(whole) < 7 and loader.n_corrupt == 1


def test_pipe_url_reads_the_same_samples(shards):
    path = shards["paths"][3]
    direct = sorted(k for b in make_eval_loader(str(path), cfg_for(workers=0), 0, 1) for k in b["key"])
    piped = sorted(k for b in make_eval_loader(f"pipe:cat {path}", cfg_for(workers=0), 0, 1) for k in b["key"])
    assert piped == direct and len(direct) == 7


def test_count_samples_scans_or_reads_the_manifest(shards, tmp_path):
    assert count_samples(shards["pattern"]) == shards["n_samples"]
    assert count_samples(f"pipe:cat {shards['paths'][3]}") == 7
    for p in shards["paths"][:2]:
        (tmp_path / p.name).write_bytes(p.read_bytes())
    entries = [{"name": p.name, "samples": 100, "bytes": p.stat().st_size} for p in shards["paths"][:2]]
    (tmp_path / "part-manifest.json").write_text(json.dumps({"shards": entries}))
    assert count_samples(str(tmp_path / "part-{000000..000001}.tar")) == 200  # the manifest's word
    entries[0]["bytes"] += 1  # stale entry: that shard is scanned instead
    (tmp_path / "part-manifest.json").write_text(json.dumps({"shards": entries}))
    assert count_samples(str(tmp_path / "part-{000000..000001}.tar")) == 5 + 100


def test_expand_pattern_forms_and_errors(shards, tmp_path):
    paths = [str(p) for p in shards["paths"]]
    assert expand_pattern(shards["pattern"]) == paths
    assert expand_pattern(str(shards["root"])) == paths  # a folder: its tar files, sorted
    assert expand_pattern(str(shards["root"] / "part-*.tar")) == paths
    assert expand_pattern(f"{paths[1]}::pipe:cat {paths[0]}") == [paths[1], f"pipe:cat {paths[0]}"]
    with pytest.raises(DataError, match=r"no shard matches the data pattern '.*nope-\{0..3\}.tar'"):
        expand_pattern(str(tmp_path / "nope-{0..3}.tar"))
    with pytest.raises(DataError, match=r"1 shard\(s\) of the data pattern .* do not exist, e.g. .*part-000009"):
        expand_pattern(str(shards["root"] / "part-{000004,000009}.tar"))
    (tmp_path / "notes.tar").write_text("hello, I am not a tar file\n" * 40)
    with pytest.raises(DataError, match=r"shard '.*notes.tar' .* is not a tar file"):
        expand_pattern(str(tmp_path / "notes.tar"))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty.tar' .* is not a tar file"):
        expand_pattern(str(tmp_path / "empty.tar"))
    with pytest.raises(DataError, match="non-empty string, got '  '"):
        expand_pattern("  ")


def test_loader_argument_errors_name_the_value(shards):
    # A DataConfig with a bad value cannot be made (it checks itself); the loaders check the rest.
    for kw, message in ((dict(image_size=0), "data.image_size must be > 0, got 0"),
                        (dict(batch_size=0), "data.batch_size must be > 0, got 0"),
                        (dict(workers=-1), "data.workers must be >= 0, got -1")):
        with pytest.raises(ValueError, match=message):
            cfg_for(shards["pattern"], **kw)
    with pytest.raises(ValueError, match="got 'purple'"):
        make_train_loader(cfg_for(shards["pattern"], background="purple"), 0, 1, seed=0)
    with pytest.raises(ValueError, match="got 'purple'"):
        make_eval_loader(shards["pattern"], cfg_for(background="purple"), 0, 1)
    with pytest.raises(ValueError, match="got rank 2 of world_size 2"):
        make_eval_loader(shards["pattern"], cfg_for(), 2, 2)
    with pytest.raises(DataError, match="non-empty string"):
        make_train_loader(cfg_for(""), 0, 1, seed=0)


def test_item_id_is_a_stable_63_bit_hash():
    assert item_id("part-000000/a0") == item_id("part-000000/a0") == 9046950618464436459
    ids = {item_id(f"s/{i}") for i in range(1000)}
    assert len(ids) == 1000 and all(0 <= i < 2**63 for i in ids)


def test_shard_name_is_location_independent():
    assert shard_name("/x/y/train-000001.tar") == "train-000001"
    assert shard_name("pipe:curl -s https://host/data/train-000002.tar.gz") == "train-000002"


# --- real processes ----------------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    from trainer.config import DataConfig
    from trainer.data import make_eval_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(image_size=16, batch_size=3, workers=2)
    results = []
    for pattern in sys.argv[2:]:
        loader = make_eval_loader(pattern, cfg, rank, world)
        results.append(([k for b in loader for k in b["key"]], loader.n_corrupt))
    parts = [None] * world
    dist.all_gather_object(parts, results)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(parts, f)
    dist.destroy_process_group()
""")


@pytest.mark.integration
@pytest.mark.slow
def test_eval_exactly_once_across_two_real_processes(shards, tmp_path):
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "keys.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    single = str(shards["paths"][3])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(out), shards["pattern"], single]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())  # [rank][pattern] -> (keys, n_corrupt)
    flat = [k for rank in parts for k in rank[0][0]]
    assert len(flat) == len(set(flat)) and set(flat) == set(shards["expected"])
    assert all(rank[0][0] for rank in parts)
    assert sum(rank[0][1] for rank in parts) == shards["n_corrupt"]
    assert len(parts[0][1][0]) == 7 and parts[1][1][0] == []  # one shard, two ranks


# --- shared data ---------------------------------------------------------------------------------------
@pytest.mark.shared_data
def test_make_shards_round_trips_pokemon_from_a_split_list(shared_data, tmp_path):
    names = (shared_data / "pokemon" / "split_every10_train.txt").read_text().split()[:6]
    listing = tmp_path / "few.txt"
    listing.write_text("\n".join(names) + "\n")
    from launch.make_shards import main as make_shards

    assert make_shards(["--input", str(listing), "--root", str(shared_data / "pokemon" / "images"), "--output",
                        str(tmp_path / "out"), "--prefix", "poke", "--samples-per-shard", "4", "--workers", "0"]) == 0
    pattern = str(tmp_path / "out" / "poke-{000000..000001}.tar")
    assert count_samples(pattern) == 6
    cfg = cfg_for(workers=0, image_size=32)
    got = {k: (b["light"][i], b["ab"][i]) for b in make_eval_loader(pattern, cfg, 0, 1)
           for i, k in enumerate(b["key"])}
    want_keys = {f"poke-{i // 4:06d}/{n.rsplit('.', 1)[0]}" for i, n in enumerate(names)}
    assert set(got) == want_keys
    for i, name in enumerate(names):
        ref = image_to_sample(load_rgb(shared_data / "pokemon" / "images" / name), 32)
        light, ab = got[f"poke-{i // 4:06d}/{name.rsplit('.', 1)[0]}"]
        assert torch.equal(light, ref["light"]) and torch.equal(ab, ref["ab"])
        with tarfile.open(tmp_path / "out" / f"poke-{i // 4:06d}.tar") as tar:
            member = tar.extractfile(f"{name.rsplit('.', 1)[0]}.png")
            assert member.read() == (shared_data / "pokemon" / "images" / name).read_bytes()

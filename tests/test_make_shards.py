"""launch/make_shards.py (trainer.shards) through its command line (subprocess; argument errors through
main(argv)), and its shards read back by trainer.data."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from launch.make_shards import main
from trainer.config import DataConfig
from trainer.data import count_samples, make_eval_loader
from trainer.shards import manifest_counts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "make_shards.py"


def image_bytes(seed: int, fmt: str, size: tuple[int, int] = (24, 16), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format=fmt)
    return buf.getvalue()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder tree: jpg/png/webp/upper-case JPEG, an RGBA png, a dotted name, a corrupt jpg, a text file."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    files = {
        "a.jpg": image_bytes(1, "JPEG"),
        "b.png": image_bytes(2, "PNG"),
        "c.webp": image_bytes(3, "WEBP"),
        "sub/D.JPEG": image_bytes(4, "JPEG", (30, 20)),
        "sub/rgba.png": image_bytes(5, "PNG", mode="RGBA"),
        "sub/deeper/my.photo.png": image_bytes(6, "PNG", (8, 40)),
        "sub/broken.jpg": b"\xff\xd8\xff definitely not a jpeg",
        "notes.txt": b"not an image, not picked up from a folder",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return root


def test_folder_to_shards_with_manifest_json_and_skips(photos, tmp_path):
    proc = run("--input", str(photos), "--output", str(tmp_path / "out"), "--prefix", "set",
               "--samples-per-shard", "4", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 6 samples in 2 shards" in proc.stdout and "skipped 1 unusable" in proc.stdout
    assert "skipped sub/broken.jpg" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "set-manifest.json").read_text())
    assert manifest["total"] == 6 and manifest["pattern"] == "set-{000000..000001}.tar"
    assert [s["samples"] for s in manifest["shards"]] == [4, 2]
    assert [s["source"] for s in manifest["skipped"]] == ["sub/broken.jpg"]
    names = []
    for shard in manifest["shards"]:
        path = tmp_path / "out" / shard["name"]
        assert path.stat().st_size == shard["bytes"]
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.uname == "" for m in members)
            names += [m.name for m in members]
            for m in members:
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    original = photos / meta["source"]
                    with Image.open(original) as img:
                        assert (meta["width"], meta["height"], meta["mode"]) == (*img.size, img.mode)
                    image = next(n for n in tar.getnames() if n.startswith(m.name[:-4]) and n != m.name)
                    assert tar.extractfile(image).read() == original.read_bytes()  # the original bytes
    # Sorted by relative path; keys lose extension and dots; the extension is lower-cased.
    assert names[::2] == ["a.jpg", "b.png", "c.webp", "sub/D.jpeg", "sub/deeper/my_photo.png", "sub/rgba.png"]


def test_output_is_deterministic_whatever_the_worker_count(photos, tmp_path):
    for out, workers in (("one", "0"), ("two", "2"), ("again", "2")):
        assert run("--input", str(photos), "--output", str(tmp_path / out), "--workers", workers,
                   "--samples-per-shard", "3").returncode == 0
    assert digest(tmp_path / "one") == digest(tmp_path / "two") == digest(tmp_path / "again")


def test_max_shard_bytes_closes_shards_first(photos, tmp_path):
    big = image_bytes(9, "PNG", (120, 120))  # ~43 KB of noise: larger than the limit on its own
    (photos / "zz_big.png").write_bytes(big)
    limit = 10240  # one tar record: a few of the small images per shard
    proc = run("--input", str(photos), "--output", str(tmp_path / "out"), "--max-shard-bytes", str(limit),
               "--samples-per-shard", "100")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    sizes = [s["bytes"] for s in manifest["shards"]]
    assert len(sizes) >= 3 and manifest["total"] == 7
    assert all(b <= limit for b in sizes[:-1]) and sizes[-1] > limit  # the big one sits alone at the end
    assert manifest["shards"][-1]["samples"] == 1


def test_list_files_resolve_names_and_report_missing(tmp_path):
    data = tmp_path / "dataset"
    (data / "images").mkdir(parents=True)
    (data / "elsewhere").mkdir()
    (data / "images" / "in_images.png").write_bytes(image_bytes(1, "PNG"))
    (data / "beside.png").write_bytes(image_bytes(2, "PNG"))
    (data / "elsewhere" / "rooted.png").write_bytes(image_bytes(3, "PNG"))
    absolute = tmp_path / "absolute.jpg"
    absolute.write_bytes(image_bytes(4, "JPEG"))
    listing = data / "split.txt"
    listing.write_text(f"in_images.png\nbeside.png\n\n# a comment\nrooted.png\nghost.png\n{absolute}\n")
    proc = run("--input", str(listing), "--root", str(data / "elsewhere"), "--output", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped ghost.png: file not found" in proc.stderr
    manifest = json.loads((tmp_path / "out" / "train-manifest.json").read_text())
    assert manifest["total"] == 4
    with tarfile.open(tmp_path / "out" / "train-000000.tar") as tar:
        assert tar.getnames()[::2] == ["in_images.png", "beside.png", "rooted.png", "absolute.jpg"]


def test_nothing_usable_fails_and_bad_arguments_are_named(tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"nope")
    out = str(tmp_path / "out")
    cases = [
        (["--input", str(bad), "--output", out], "none of the 1 images could be used (1 skipped)"),
        (["--input", str(tmp_path / "missing"), "--output", out], f"--input {str(tmp_path / 'missing')!r} does not exist"),
        (["--input", str(bad), "--output", out, "--samples-per-shard", "0"], "--samples-per-shard must be >= 1, got 0"),
        (["--input", str(bad / "x.jpg"), "--output", out, "--prefix", "a/b"], "--prefix must be a plain file name "
                                                                             "prefix, got 'a/b'"),
    ]
    for argv, message in cases:
        assert main([*argv, "--workers", "0"]) == 1
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == f"make_shards: error: {message}", err
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "train-manifest.json").exists()


def test_rerun_replaces_old_shards_and_the_loader_reads_the_output(photos, tmp_path):
    out = tmp_path / "out"
    assert run("--input", str(photos), "--output", str(out), "--samples-per-shard", "1").returncode == 0
    assert len(list(out.glob("train-*.tar"))) == 6
    assert run("--input", str(photos), "--output", str(out), "--samples-per-shard", "4").returncode == 0
    assert sorted(p.name for p in out.glob("train-*.tar")) == ["train-000000.tar", "train-000001.tar"]
    pattern = str(out / "train-{000000..000001}.tar")
    assert count_samples(pattern) == 6
    assert {name: n for name, (n, _) in manifest_counts(out).items()} == {"train-000000.tar": 4, "train-000001.tar": 2}
    cfg = DataConfig(image_size=8, batch_size=4, workers=2)
    keys = sorted(k for rank in range(2) for b in make_eval_loader(pattern, cfg, rank, 2) for k in b["key"])
    assert keys == sorted(["train-000000/a", "train-000000/b", "train-000000/c", "train-000000/sub/D",
                           "train-000001/sub/deeper/my_photo", "train-000001/sub/rgba"])


def test_sample_keys_are_tar_safe_and_unique():
    from trainer.shards import sample_key

    taken: set[str] = set()
    keys = [sample_key(n, taken) for n in ("a b.jpg", "a_b.png", "dir/x.y.z.png", "__meta__.png", "/", "ü.png")]
    assert keys == ["a_b", "a_b_1", "dir/x_y_z", "x__meta__", "image", "_"]
    assert len(set(keys)) == len(keys)


def test_manifest_counts_skips_an_unreadable_manifest(tmp_path, caplog):
    (tmp_path / "good-manifest.json").write_text(json.dumps({"shards": [{"name": "g.tar", "samples": 3,
                                                                         "bytes": 10240}]}))
    (tmp_path / "bad-manifest.json").write_text("{not json")
    assert manifest_counts(tmp_path) == {"g.tar": (3, 10240)}
    assert "ignoring unreadable manifest" in caplog.text and "bad-manifest.json" in caplog.text

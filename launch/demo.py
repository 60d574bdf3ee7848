"""`make demo`: the whole system end to end on a CPU in a few minutes, with nothing downloaded.

1. Takes the public-domain / CC0 colour photos that ship inside scikit-image (NASA's astronaut,
   rocket and Hubble deep field, the CC0 cat, coffee and retina photos, the IHC slide) and holds two out.
2. Cuts random crops of the others into a folder and packs them into WebDataset shards
   (launch/make_shards.py).
3. Trains both phases briefly (launch/train.py, configs/demo.yaml) with the embedded memory server.
4. Colorizes the held-out photos in gray (launch/colorize.py) and writes a comparison sheet.

    python launch/demo.py [--out demo] [--phase1-steps N] [--phase2-steps N]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from launch.common import module_command, run_step

REPO = Path(__file__).resolve().parents[1]

# Photos scikit-image ships in its wheel, with their licences (skimage.data docstrings).
PHOTOS = {
    "astronaut.png": "NASA, public domain",
    "rocket.jpg": "SpaceX, public domain",
    "hubble_deep_field.jpg": "NASA, public domain",
    "retina.jpg": "CC0 (M. Haggstrom)",
    "ihc.png": "no known copyright restrictions",
    "chelsea.png": "CC0 (S. van der Walt)",
    "coffee.png": "CC0 (R. Michetti)",
}
HELD_OUT = ("chelsea.png", "coffee.png")
CROPS_PER_PHOTO = 48
CROP_SIZE = 96


def skimage_photos() -> dict[str, Path]:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("scikit-image is not installed: run `make install` (it is part of the [dev] extra)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    found = {name: data / name for name in PHOTOS if (data / name).is_file()}
    missing = sorted(set(PHOTOS) - set(found))
    if missing:
        raise SystemExit(f"scikit-image's data folder {data} lacks {missing}")
    return found


def write_crops(photos: dict[str, Path], folder: Path, seed: int = 0) -> int:
    """Random square crops (25-100% of the short side) of each training photo, resized to CROP_SIZE."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, path in sorted(photos.items()):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        for i in range(CROPS_PER_PHOTO):
            side = int(min(w, h) * rng.uniform(0.25, 1.0))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((CROP_SIZE, CROP_SIZE), Image.LANCZOS)
            crop.save(folder / f"{Path(name).stem}_{i:03d}.png")
            n += 1
    return n


def comparison_sheet(originals: list[Path], colorized: list[Path], out: Path, height: int = 192) -> Path:
    """One row per held-out photo: gray input | PCCNet | original."""
    rows = []
    for orig, col in zip(originals, colorized):
        o = Image.open(orig).convert("RGB")
        scale = height / o.height
        size = (max(1, int(o.width * scale)), height)
        o = o.resize(size, Image.LANCZOS)
        g = o.convert("L").convert("RGB")
        c = Image.open(col).convert("RGB").resize(size, Image.LANCZOS)
        rows.append(np.concatenate([np.asarray(g), np.full((height, 4, 3), 255, np.uint8), np.asarray(c),
                                    np.full((height, 4, 3), 255, np.uint8), np.asarray(o)], axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    Image.fromarray(np.concatenate(rows)).save(out)
    return out


def run_demo(out: Path, phase1_steps: int | None, phase2_steps: int | None) -> int:
    """Crops -> shards -> both training phases -> colorized held-out photos and a comparison sheet."""
    t_start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)  # the demo always starts clean; its folder holds nothing else
    photos = skimage_photos()
    train = {k: v for k, v in photos.items() if k not in HELD_OUT}
    held = [photos[k] for k in HELD_OUT]
    print(f"demo: {len(train)} training photos, {len(held)} held out ({', '.join(HELD_OUT)}), from scikit-image")
    n = write_crops(train, out / "crops")
    print(f"demo: {n} training crops of {CROP_SIZE}x{CROP_SIZE} in {out / 'crops'}")
    run_step(module_command("make_shards", "--input", out / "crops", "--output", out / "shards", "--prefix", "train",
                            "--samples-per-shard", "64"), "making shards", cwd=REPO)
    shards = sorted((out / "shards").glob("train-*.tar"))
    overrides = [f"data.train={out / 'shards'}/train-{{000000..{len(shards) - 1:06d}}}.tar", f"run.out_dir={out / 'run'}"]
    overrides += [f"phase{i}.steps={s}" for i, s in ((1, phase1_steps), (2, phase2_steps)) if s is not None]
    run_step(module_command("train", "--config", "configs/demo.yaml", "--resume", "none", *overrides), "training",
             cwd=REPO)
    run_step(module_command("colorize", "--checkpoint", out / "run", "--input", *held, "--output", out / "colorized"),
             "colorizing", cwd=REPO)
    sheet = comparison_sheet(held, [out / "colorized" / f"{p.stem}.png" for p in held], out / "comparison.png")
    print(f"\ndemo finished in {time.perf_counter() - t_start:.0f} s")
    print(f"  colorized held-out photos: {out / 'colorized'}")
    print(f"  gray | PCCNet | original:  {sheet}")
    print(f"  training run (checkpoints, samples, stats.jsonl, loss_curves.png): {out / 'run'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo", help="working folder (default: demo/, git-ignored)")
    parser.add_argument("--phase1-steps", type=int, default=None, help="override configs/demo.yaml")
    parser.add_argument("--phase2-steps", type=int, default=None, help="override configs/demo.yaml")
    args = parser.parse_args(argv)
    out = (REPO / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    return run_demo(out, args.phase1_steps, args.phase2_steps)


if __name__ == "__main__":
    sys.exit(main())

"""Images/s of the data pipeline (shards -> batched Lab tensors + colour features) against a folder baseline.

Baseline, same run: the same images read from a folder with Pillow in a plain torch Dataset/DataLoader
doing the same transforms one image at a time (full decode, crop, Lanczos, rgb_to_lab, the all-pixel
colour distribution, default collate). Also: time per stage, the rate without the colour-feature
estimate (to separate its share), and the ratio to the phase-2 training step's consumption.

  python benchmarks/data_pipeline.py [--quick] [--images N] [--source flowers|pokemon|synthetic]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
# Run as a script, this folder comes first on sys.path and its trainer.py would shadow the trainer package.
sys.path.insert(0, str(REPO))

import trainer.images as images  # noqa: E402
from pccnet.color import color_distribution, normalize_ab, normalize_light, rgb_to_lab  # noqa: E402
from trainer.config import DataConfig  # noqa: E402
from trainer.data import _shard_samples, expand_pattern, make_train_loader  # noqa: E402
from trainer.shards import item_id, write_shards  # noqa: E402

BATCH = 8
WARMUP_BATCHES = 3  # per run, not timed: worker start-up and the shuffle buffer's first fill


# --- the images ---------------------------------------------------------------------------------------
def shared_dir() -> Path | None:
    path = Path(os.environ.get("PCCNET_SHARED_DATA", REPO.parent / "shared" / "data"))
    return path if path.is_dir() else None


def pick_images(source: str, n: int, tmp: Path) -> tuple[list[Path], str]:
    shared = shared_dir()
    if source != "synthetic" and shared is not None:
        pool = sorted((shared / "flowers102" / "test_udacity").glob("*/*.jpg")) if source == "flowers" else sorted(
            (shared / "pokemon" / "images").glob("*.png"))
        step = max(1, len(pool) // n)
        files = pool[::step][:n]
        what = "flowers102/test_udacity JPEG 500-900 px" if source == "flowers" else "pokemon RGBA PNG 256 px"
        return files, f"{len(files)} real images ({what})"
    rng = np.random.default_rng(0)
    folder = tmp / "synthetic"
    folder.mkdir()
    files = []
    for i in range(n):  # smooth colour fields plus texture, photo-like sizes, JPEG q90
        h, w = 500, int(rng.integers(500, 760))
        y, x = np.mgrid[0:h, 0:w] / 100.0
        a, b, c = rng.uniform(0.3, 2.0, 3)
        img = np.stack([np.sin(a * x + i), np.cos(b * y), np.sin(c * (x + y))], -1) * 100 + 128
        img += rng.normal(0, 12, img.shape)
        path = folder / f"img_{i:05d}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
        files.append(path)
    return files, f"{n} synthetic JPEGs (500 x 500-760 px)"


# --- the baseline: a folder, Pillow, one image at a time ----------------------------------------------
def naive_sample(path: Path, size: int, flip: bool) -> dict[str, torch.Tensor]:
    """The straightforward per-image transform: full decode, crop, Lanczos, Lab, all-pixel feature."""
    img = Image.open(path)
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    img = img.convert("RGB")
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255.0)
    lab = rgb_to_lab(x[None])
    feature = color_distribution(lab[:, 1:])[0]
    if flip:
        lab = lab.flip(-1)
    return {"light": normalize_light(lab[0, :1]), "ab": normalize_ab(lab[0, 1:]), "color_feature": feature}


class FolderDataset(Dataset):
    def __init__(self, files: list[Path], size: int, length: int) -> None:
        self.files, self.size, self.length = files, size, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        path = self.files[i % len(self.files)]
        out = naive_sample(path, self.size, flip=bool(torch.rand(()) < 0.5))
        out["key"] = path.name
        return out


# --- timing -------------------------------------------------------------------------------------------
def timed_rate(batches, n_batches: int, clock=time.perf_counter) -> float:
    """Images per second of `clock` over n_batches after WARMUP_BATCHES untimed ones."""
    it = iter(batches)
    for _ in range(WARMUP_BATCHES):
        next(it)
    start, n = clock(), 0
    for _ in range(n_batches):
        n += len(next(it)["key"])
    return n / (clock() - start)


def pipeline_rate(pattern: str, size: int, workers: int, n_batches: int, clock=time.perf_counter,
                  warm_batches: int = 0) -> float:
    """Training-loader images/s; the sample cache (data.cache_mb) is off unless warm_batches > 0 (then: warm it
    first, at the default size)."""
    cfg = DataConfig(train=pattern, image_size=size, batch_size=BATCH, workers=workers, flip=True,
                     shuffle_buffer=64, cache_mb=DataConfig.cache_mb if warm_batches else 0)
    with make_train_loader(cfg, 0, 1, seed=0) as loader:
        for _ in range(warm_batches):
            next(loader)
        return timed_rate(loader, n_batches, clock)


def baseline_rate(files: list[Path], size: int, workers: int, n_batches: int, clock=time.perf_counter) -> float:
    ds = FolderDataset(files, size, (n_batches + WARMUP_BATCHES) * BATCH)
    return timed_rate(DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers), n_batches, clock)


REPEATS = 3  # best-of for the CPU-time tables (1 with --quick)


def per_image_ms(fn: Callable[[], object], n: int) -> float:
    """CPU milliseconds per image of fn() (best of REPEATS): robust to other load on the machine."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best / n * 1e3


def stage_table(files: list[Path], pattern: str, size: int) -> list[tuple[str, float, float]]:
    """(stage, pipeline ms/img, baseline ms/img), one process, one thread."""
    n = len(files)
    raw = [p.read_bytes() for p in files]
    rows = []

    class _Quiet:  # a reporter stand-in: these shards have no errors
        def failure(self, *a, **k):
            raise AssertionError(a)

        handler = failure

    urls = expand_pattern(pattern)
    n_in_shards = sum(1 for u in urls for _ in _shard_samples(u, _Quiet()))
    rows.append(("read (tar stream / open+read file)",
                 per_image_ms(lambda: [s for u in urls for s in _shard_samples(u, _Quiet())], n_in_shards),
                 per_image_ms(lambda: [p.read_bytes() for p in files], n)))

    def decode(draft: bool) -> list[Image.Image]:
        out = []
        for blob in raw:
            img = Image.open(io.BytesIO(blob))
            if draft and img.format == "JPEG":
                short, keep = min(img.size), size * images.DRAFT_MARGIN
                if short >= 2 * keep:
                    img.draft("RGB", tuple(math.ceil(d * keep / short) for d in img.size))
            img.load()
            out.append(img)
        return out

    decoded = {True: decode(True), False: decode(False)}
    rows.append(("decode (JPEG draft in the pipeline)", per_image_ms(lambda: decode(True), n),
                 per_image_ms(lambda: decode(False), n)))
    white = (255, 255, 255)
    rgb = {k: [images._to_rgb(i, white) for i in v] for k, v in decoded.items()}
    rows.append(("composite / convert to RGB", per_image_ms(lambda: [images._to_rgb(i, white) for i in decoded[True]], n),
                 per_image_ms(lambda: [images._to_rgb(i, white) for i in decoded[False]], n)))

    def naive_resize(img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        return img.resize((size, size), Image.Resampling.LANCZOS)

    rows.append(("centre crop + Lanczos resize", per_image_ms(lambda: [images.center_crop_resize(i, size) for i in rgb[True]], n),
                 per_image_ms(lambda: [naive_resize(i) for i in rgb[False]], n)))
    pixels = np.stack([np.asarray(images.center_crop_resize(i, size)) for i in rgb[True]])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255.0)
    chunk = max(1, images.LAB_CHUNK_PIXELS // (size * size))
    rows.append(("rgb_to_lab (chunks of 64k pixels / per image)",
                 per_image_ms(lambda: [rgb_to_lab(x[i:i + chunk]) for i in range(0, n, chunk)], n),
                 per_image_ms(lambda: [rgb_to_lab(x[i:i + 1]) for i in range(n)], n)))
    ab = rgb_to_lab(x)[:, 1:]
    rows.append(("colour feature (<= 64x64 grid / all pixels)",
                 per_image_ms(lambda: [images.color_feature(ab[i:i + 1]) for i in range(n)], n),
                 per_image_ms(lambda: [color_distribution(ab[i:i + 1]) for i in range(n)], n)))
    samples = [naive_sample(files[0], size, False) | {"key": "k"} for _ in range(BATCH)]
    from torch.utils.data import default_collate

    def pipeline_collate() -> None:
        for i in range(0, n, BATCH):
            stacked = np.stack(list(pixels[i:i + BATCH]))
            torch.tensor([item_id(f"shard/{j}") for j in range(len(stacked))], dtype=torch.int64)

    rows.append(("collate (uint8 stack + ids / default_collate)", per_image_ms(pipeline_collate, n),
                 per_image_ms(lambda: [default_collate(samples) for _ in range(0, n, BATCH)], n)))
    return rows


def precompute_table(files: list[Path], size: int) -> list[tuple[str, float, float]]:
    """What storing per-sample results in the shards would save: (option, CPU ms/img, bytes/sample)."""
    n = len(files)
    raw = [p.read_bytes() for p in files]
    pixels = [images.center_crop_resize(images.load_rgb(d, draft_size=size), size) for d in raw]
    x = torch.from_numpy(np.stack([np.asarray(p) for p in pixels])).permute(0, 3, 1, 2).float().div(255.0)
    ab = rgb_to_lab(x)[:, 1:]
    feats = [images.color_feature(ab[i:i + 1])[0].numpy() for i in range(n)]
    as_bytes = [f.astype(np.float32).tobytes() for f in feats]
    as_json = [json.dumps([round(float(v), 6) for v in f]).encode() for f in feats]
    pngs = []
    for p in pixels:
        buf = io.BytesIO()
        p.save(buf, format="PNG")
        pngs.append(buf.getvalue())
    flat = [np.asarray(p).tobytes() for p in pixels]
    mean = lambda xs: sum(len(v) for v in xs) / len(xs)  # noqa: E731
    return [
        ("colour feature: computed (<= 64x64 grid)",
         per_image_ms(lambda: [images.color_feature(ab[i:i + 1]) for i in range(n)], n), 0.0),
        ("colour feature: stored as 313 float32", per_image_ms(
            lambda: [torch.from_numpy(np.frombuffer(b, np.float32).copy()) for b in as_bytes], n), mean(as_bytes)),
        ("colour feature: stored in the json", per_image_ms(
            lambda: [torch.tensor(json.loads(b)) for b in as_json], n), mean(as_json)),
        ("pixels: original image, decode + crop + resize", per_image_ms(
            lambda: [images.center_crop_resize(images.load_rgb(d, draft_size=size), size) for d in raw], n),
         mean(raw)),
        (f"pixels: stored pre-resized {size}px PNG, decode", per_image_ms(
            lambda: [images.load_rgb(b) for b in pngs], n), mean(pngs)),
        (f"pixels: stored raw {size}x{size}x3 uint8", per_image_ms(
            lambda: [np.frombuffer(b, np.uint8).reshape(size, size, 3).copy() for b in flat], n), mean(flat)),
    ]


def training_rate() -> float | None:
    """Phase-2 images/s at the CPU training config, from benchmarks/model_step.py if it exists."""
    try:
        from model_step import phase2_images_per_second
    except ImportError:
        try:
            from benchmarks.model_step import phase2_images_per_second
        except ImportError:
            return None
    return float(phase2_images_per_second(image_size=64, batch_size=8, width=32))


# --- main ---------------------------------------------------------------------------------------------
def run(quick: bool, n_images: int | None, source: str) -> dict:
    global REPEATS
    REPEATS = 1 if quick else 3
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # DataLoader workers run one thread each; the stage table matches them
    n_images = n_images or (48 if quick else 400)
    rounds = 1 if quick else 5
    results: dict = {"rates": [], "stages": {}, "cpu": {}, "precompute": {}}
    with tempfile.TemporaryDirectory(prefix="pccnet-bench-") as tmp:
        files, what = pick_images(source, n_images, Path(tmp))
        results["images"] = what
        manifest = write_shards([str(f) for f in files], Path(tmp) / "shards", "bench",
                                samples_per_shard=max(4, math.ceil(len(files) / 8)), workers=2, progress=False)
        pattern = str(Path(tmp) / "shards" / manifest["pattern"])
        print(f"data: {what}; {len(manifest['shards'])} shards; batch {BATCH}; {rounds} round(s), median")
        for size in (64, 256):
            n_batches = 6 if quick else (50 if size == 64 else 20)
            for workers in (1, 2):
                pipe, base = [], []
                for r in range(rounds):  # interleaved, alternating order: load drifts hit both alike
                    for which in ("pipe", "base") if r % 2 == 0 else ("base", "pipe"):
                        if which == "pipe":
                            pipe.append(pipeline_rate(pattern, size, workers, n_batches))
                        else:
                            base.append(baseline_rate(files, size, workers, n_batches))
                saved, images.FEATURE_GRID = images.FEATURE_GRID, 10**9  # all pixels, like the baseline
                try:  # one shorter round: this variant only shows the colour feature's share
                    exact = pipeline_rate(pattern, size, workers, max(4, n_batches // 3))
                finally:
                    images.FEATURE_GRID = saved
                # Later epochs: each worker has met (almost) every shard (2-4 passes per worker) and cached it.
                warm = pipeline_rate(pattern, size, workers, n_batches,
                                     warm_batches=(2 if quick else 4) * math.ceil(len(files) / BATCH) * workers)
                row = dict(size=size, workers=workers, pipeline=float(np.median(pipe)),
                           baseline=float(np.median(base)), pipeline_all_pixels=exact, pipeline_warm=warm,
                           ratio=float(np.median(np.array(pipe) / np.array(base))))
                results["rates"].append(row)
                print(f"  {size:>3}px x {workers} worker(s): pipeline {row['pipeline']:7.1f} img/s, baseline "
                      f"{row['baseline']:7.1f} img/s ({row['ratio']:.2f}x); all-pixel feature {exact:7.1f}; "
                      f"warm cache {warm:7.1f} img/s", flush=True)
        for size in (64, 256):  # whole pipeline in this process: CPU time, immune to other load
            n_batches = 6 if quick else 24
            results["cpu"][size] = dict(
                pipeline=1e3 / pipeline_rate(pattern, size, 0, n_batches, time.thread_time),
                baseline=1e3 / baseline_rate(files, size, 0, n_batches, time.thread_time))
            print(f"  {size:>3}px in-process CPU ms/img: pipeline {results['cpu'][size]['pipeline']:.2f}, "
                  f"baseline {results['cpu'][size]['baseline']:.2f}", flush=True)
        for size in (64, 256):
            results["precompute"][size] = precompute_table(files[: min(len(files), 24 if quick else 96)], size)
        for size in (64, 256):
            results["stages"][size] = stage_table(files[: min(len(files), 24 if quick else 96)], pattern, size)
    torch.set_num_threads(threads)  # the training step runs with the process's usual threads
    results["train_rate"] = training_rate()
    return results


def _table(title: str, header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A Markdown table after a blank line and its title; the first column left-aligned, the rest right."""
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(results: dict) -> None:
    print(f"\nimages/s (wall clock, median of rounds), {results['images']}, batch {BATCH}:")
    print("| size | workers | pipeline (cold) | folder baseline | ratio | cold, all-pixel feature | its ratio "
          "| pipeline, warm cache | its ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rates"]:
        print(f"| {r['size']} | {r['workers']} | {r['pipeline']:.1f} | {r['baseline']:.1f} | "
              f"{r['ratio']:.2f}x | {r['pipeline_all_pixels']:.1f} | "
              f"{r['pipeline_all_pixels'] / r['baseline']:.2f}x | {r['pipeline_warm']:.1f} | "
              f"{r['pipeline_warm'] / r['baseline']:.2f}x |")
    print("\nwhole pipeline in one process (workers=0), CPU ms per image:")
    print("| size | pipeline | folder baseline | ratio |")
    print("|---:|---:|---:|---:|")
    for size, c in results["cpu"].items():
        print(f"| {size} | {c['pipeline']:.2f} | {c['baseline']:.2f} | {c['baseline'] / c['pipeline']:.2f}x |")
    for size, rows in results["stages"].items():
        _table(f"CPU ms per image by stage at {size} px (one thread, best of {REPEATS}):", ("stage", "pipeline", "baseline"),
               [(name, f"{p:.2f}", f"{b:.2f}") for name, p, b in rows]
               + [("total", f"{sum(r[1] for r in rows):.2f}", f"{sum(r[2] for r in rows):.2f}")])
    for size, rows in results["precompute"].items():
        _table(f"precompute options at {size} px: CPU ms per image (one thread), bytes per sample in the shard:",
               ("option", "CPU ms/img", "bytes/sample"), [(name, f"{ms:.3f}", f"{n:,.0f}") for name, ms, n in rows])
    train = results["train_rate"]
    print("\npipeline rate / phase-2 training consumption (CPU config: 64 px, batch 8, width 32):")
    print("| workers | pipeline img/s | training img/s | ratio |")
    print("|---:|---:|---:|---:|")
    for r in results["rates"]:
        if r["size"] != 64:
            continue
        if train is None:
            print(f"| {r['workers']} | {r['pipeline']:.1f} | n/a | n/a |")
        else:
            print(f"| {r['workers']} | {r['pipeline']:.1f} | {train:.1f} | {r['pipeline'] / train:.1f}x |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 images, fewer batches (< 1 minute)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 400, quick 48)")
    parser.add_argument("--source", choices=("flowers", "pokemon", "synthetic"), default="flowers",
                        help="real images from ../shared/data when present, else synthetic")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results = run(args.quick, args.images, args.source)
    print_tables(results)
    print(f"\n(wall {time.perf_counter() - started:.0f} s)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
